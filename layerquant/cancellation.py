"""The process's cancellation flag: set by a signal handler (infra/interrupts.py), checked by
long loops at every block, batch and layer so a stop asked for lands within seconds.

Process-wide on purpose: a signal is delivered to the process, not to one run, and the checks
sit in pure solver loops that must not know about signals or Prefect.
"""
from __future__ import annotations

import signal
import threading

from layerquant.errors import Cancelled

_requested = threading.Event()
_signum: list[int] = []


def cancel_requested() -> bool:
    return _requested.is_set()


def raise_if_cancelled() -> None:
    """Raise `Cancelled` if a stop was asked for (a no-op outside the CLI)."""
    if _requested.is_set():
        raise Cancelled(_signum[0] if _signum else signal.SIGINT)


def request_cancel(signum: int = signal.SIGINT) -> None:
    if not _requested.is_set():
        _signum[:] = [int(signum)]
        _requested.set()


def reset() -> None:
    _requested.clear()
    _signum.clear()
