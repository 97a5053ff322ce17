"""Ctrl-C and SIGTERM for CLI runs: a cancellation flag, checked between blocks and batches.

Python's default turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be,
and the terminal sends it to the whole process group, Prefect's temporary API server included:
the server died, the block kept computing, then every Prefect call failed with connection
errors for minutes. The CLI instead (1) starts the temporary server in its own session, out of
reach of the group's signals (it is still stopped when the CLI exits), and (2) turns the first
SIGINT/SIGTERM into a flag that the flow and its tasks check at every block and batch; the run
then stops with `Cancelled`, its manifest says "cancelled", and a re-run resumes from the store.
A second signal interrupts at once.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import types

# the flag lives in core, where solver loops can check it; re-exported for the CLI and tests
from layerquant.cancellation import cancel_requested, raise_if_cancelled, request_cancel, reset  # noqa: F401


def _quiet_prefect_console() -> None:
    """The run is being stopped on purpose: Prefect's own failure logs (with tracebacks) on the
    console would bury the one line the CLI prints."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(_not_prefect)


def _not_prefect(record: logging.LogRecord) -> bool:
    return not record.name.startswith("prefect")


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    if cancel_requested():
        raise KeyboardInterrupt  # a second signal: stop now, wherever we are
    request_cancel(signum)
    _quiet_prefect_console()


def install_handlers() -> dict[int, object]:
    """First SIGINT / SIGTERM sets the cancellation flag (main thread only, as Python requires).
    Returns the previous handlers, for `restore_handlers`."""
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _handler)
    return previous


def restore_handlers(previous: dict[int, object]) -> None:
    """Back to the handlers before `install_handlers` (main() called in-process, e.g. by tests)."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    reset()


def _parent_death_signal() -> None:
    """In the server's child, before exec: its own session, and SIGTERM when the CLI dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def shield_ephemeral_server() -> None:
    """Start Prefect's temporary API server in a session of its own, so the terminal's Ctrl-C
    (sent to the whole process group) does not kill it under the running flow. Prefect stops it
    at exit as before; should the CLI be killed outright, the kernel sends it SIGTERM."""
    from prefect.server.api import server

    if isinstance(server.subprocess, types.SimpleNamespace):
        return
    shim = types.SimpleNamespace(**vars(subprocess))

    def popen(*args, **kwargs):
        if threading.current_thread() is threading.main_thread() or threading.current_thread().name == SERVER_KEEPER_THREAD:
            # the death signal follows the thread that forked: only the main thread lives as long as we do
            kwargs.setdefault("preexec_fn", _parent_death_signal)
        else:
            kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(*args, **kwargs)

    shim.Popen = popen
    server.subprocess = shim


# the thread that starts the temporary server early; it lives as long as the process, so the
# server's parent-death signal (which follows the forking thread) fires only when the CLI dies
SERVER_KEEPER_THREAD = "layerquant-prefect-server"


class EarlyServer:
    """Prefect starts its temporary API server when the flow starts, and the CLI then waits
    for it (about 6 s on 2 cores) with nothing else to do. Started here, it boots while the CLI
    imports, reads the model's headers and tokenizes the texts; Prefect's own `start()` (called
    by the flow, and by its log and event clients) then waits until the server is healthy.

    Until a flow asks for it, Prefect's start and stop lines stay off the console, and `close()`
    stops a server nobody used (at once, or as soon as it has booted): input that fails its
    checks still ends with one line, and a process that runs many commands keeps no stray server."""

    def __init__(self, server) -> None:
        self.server = server  # Prefect's SubprocessASGIServer for the run: one per process
        self.used = False
        self._ready = threading.Event()
        self._closed = False
        self._lock = threading.Lock()  # closing and booting finish in either order
        self._failures: list[BaseException] = []
        # Prefect logs the server's start and stop on its root logger (whose level its logging
        # setup may reset later: a filter stays)
        self._prefect_logger = logging.getLogger("prefect")
        self._quiet = _ServerLinesFilter()
        self._prefect_logger.addFilter(self._quiet)
        prefect_start = self.server.start

        def keep() -> None:
            try:
                prefect_start()
            except BaseException as exc:  # handed to whoever needs the server next
                self._failures.append(exc)
            finally:
                self._ready.set()
            with self._lock:
                if self._closed:  # closed while booting: nobody will use it
                    self._stop_quietly()
            threading.Event().wait()

        self.server.start = self._start_when_ready
        threading.Thread(target=keep, name=SERVER_KEEPER_THREAD, daemon=True).start()

    def _start_when_ready(self, timeout: int | None = None) -> None:  # noqa: ARG001 - Prefect's signature
        self._ready.wait()
        if not self.used:
            self.used = True
            self._prefect_logger.removeFilter(self._quiet)
        if self._failures:
            del self.server.start  # Prefect's own start again: the next call tries afresh
            raise self._failures[0]

    def close(self) -> None:
        """After the command: a server no flow asked for is stopped, without a word."""
        if self.used:
            return
        with self._lock:
            self._closed = True
            vars(self.server).pop("start", None)
            if self._ready.is_set():
                self._stop_quietly()
            # else the keeper stops it once booted (not waited for here: bad input fails fast)

    def _stop_quietly(self) -> None:
        quiet = _ServerLinesFilter()
        self._prefect_logger.addFilter(quiet)
        try:
            self.server.stop()
        finally:
            self._prefect_logger.removeFilter(quiet)
            self._prefect_logger.removeFilter(self._quiet)


class _ServerLinesFilter(logging.Filter):
    """Drops Prefect's "Starting/Stopping temporary server" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "temporary server" not in record.getMessage()


def start_ephemeral_server_early() -> EarlyServer | None:
    """The temporary server, started now (see EarlyServer); None when the run talks to a server
    of its own (PREFECT_API_URL) or this process already has one."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running or "start" in vars(server):
        return None
    return EarlyServer(server)


_prefect_capture_sigterm: list = []


def keep_sigterm_for_cancellation() -> None:
    """Prefect's flow engine swaps in its own SIGTERM handler for every flow run: a bridge for
    a runner's cancellations (a CLI run has no runner) that raises wherever the code happens to
    be, ending the run Crashed with a traceback. CLI runs keep ours: SIGTERM stops like Ctrl-C."""
    import contextlib

    from prefect import flow_engine

    if _prefect_capture_sigterm:
        return

    @contextlib.contextmanager
    def keep_ours():
        yield

    _prefect_capture_sigterm.append(flow_engine.capture_sigterm)
    flow_engine.capture_sigterm = keep_ours


def give_sigterm_back_to_prefect() -> None:
    from prefect import flow_engine

    if _prefect_capture_sigterm:
        flow_engine.capture_sigterm = _prefect_capture_sigterm.pop()
