"""Leases in the artifact store: one run computes a piece of work, the others wait for it.

Two runs of the same configuration on one store (or several workers on one run) reach the same
block at about the same time. The first takes the block's lease, a small JSON record in the
store, and computes; the others see a live lease, wait, and find the finished artifact in the
store. A holder that dies stops renewing its lease; once it expires the next one takes over (at
once, when the holder ran on the same machine and its process is gone).

Layout: leases/{name}/{generation:08d}.json, one record per holding, never rewritten by anyone
but its holder:
    {"holder": "host:pid:nonce", "generation": 3, "acquired": t, "heartbeat": t, "expires": t,
     "released": false, "computed": null}
Taking the lease is creating the next generation's record with the store's atomic
create-if-absent (a hard link locally, a conditional PUT on S3), so of two contenders exactly
one wins, and taking over an expired holding needs no delete that could race. Released records
stay as the lease log: who computed what (`computed: true`), and who found it done.

Leases only save time; they never decide what is correct. Artifacts are content addressed and
deterministic, so the worst a lease can do wrong (a holder taken for dead while alive, an S3
endpoint that ignores If-None-Match, clocks far apart) is let a block be computed twice.
Expiry compares wall clocks of different machines: keep the TTL well above their skew.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from layerquant.cancellation import raise_if_cancelled
from layerquant.infra.store import ArtifactStore

log = logging.getLogger("layerquant.lease")

LEASE_ROOT = "leases"
DEFAULT_TTL_S = 60.0
TTL_ENV = "LAYERQUANT_LEASE_TTL_S"


def lease_ttl() -> float:
    """Seconds a holding lives without a heartbeat (LAYERQUANT_LEASE_TTL_S, default 60): how
    long the others wait for a holder that died. Heartbeats come every third of it."""
    return float(os.environ.get(TTL_ENV, DEFAULT_TTL_S))


def new_holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_gone(holder: str) -> bool:
    """Whether `holder` ran on this machine in a process that no longer exists: its lease can be
    taken over at once instead of after its TTL (a re-run right after a SIGKILL, the usual case).
    Holders elsewhere are judged by their heartbeat alone."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


@dataclass
class LeaseRecord:
    holder: str
    generation: int
    acquired: float
    heartbeat: float
    expires: float
    released: bool = False
    computed: bool | None = None  # on release: whether the holder did the work (False: found it done)

    def live(self, now: float) -> bool:
        return not self.released and now < self.expires

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def lease_path(name: str, generation: int) -> str:
    return f"{LEASE_ROOT}/{name}/{generation:08d}.json"


def lease_log(store: ArtifactStore, name: str) -> list[LeaseRecord]:
    """Every holding of lease `name`, oldest first (unreadable records left out)."""
    records = []
    for path in store.list_paths(f"{LEASE_ROOT}/{name}/"):
        record = _read(store, path)
        if record is not None:
            records.append(record)
    return sorted(records, key=lambda r: r.generation)


def _read(store: ArtifactStore, path: str) -> LeaseRecord | None:
    raw = store.read_bytes(path)
    if raw is None:
        return None
    try:
        return LeaseRecord(**json.loads(raw))
    except (ValueError, TypeError):
        return None  # torn or foreign: treated as expired (at worst, work is done twice)


def _latest_generation(store: ArtifactStore, name: str) -> int:
    generations = []
    for path in store.list_paths(f"{LEASE_ROOT}/{name}/"):
        stem = path.rsplit("/", 1)[-1].split(".", 1)[0]
        if stem.isdigit():
            generations.append(int(stem))
    return max(generations, default=0)


class Lease:
    """A holding of lease `name` by `holder`; renew it while working, release it when done."""

    def __init__(self, store: ArtifactStore, name: str, record: LeaseRecord, ttl_s: float):
        self.store, self.name, self.record, self.ttl_s = store, name, record, ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return lease_path(self.name, self.record.generation)

    def still_ours(self) -> bool:
        """Whether nobody took over (a later generation exists only if we were taken for dead)."""
        return _latest_generation(self.store, self.name) == self.record.generation

    def renew(self) -> None:
        now = time.time()
        self.record.heartbeat, self.record.expires = now, now + self.ttl_s
        if not self.still_ours():
            log.warning("lease %s: taken over after a missed heartbeat; this block may be computed twice", self.name)
            return
        self.store.write_bytes(self.path, self.record.encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat costs a duplicate computation at worst
                log.warning("lease %s: heartbeat failed (%s)", self.name, type(exc).__name__)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.name}", daemon=True)
        self._thread.start()

    def release(self, computed: bool) -> None:
        """Mark the holding released (kept as the lease log); the next contender takes the next
        generation. Never raises: a release that fails leaves a lease that expires."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.record.released, self.record.computed = True, computed
        try:
            if self.still_ours():
                self.store.write_bytes(self.path, self.record.encode())
        except Exception as exc:  # noqa: BLE001
            log.warning("lease %s: release failed (%s); it expires in %.0f s", self.name, type(exc).__name__, self.ttl_s)


def try_acquire(store: ArtifactStore, name: str, holder: str, ttl_s: float) -> Lease | LeaseRecord | None:
    """One attempt: our Lease, the live LeaseRecord of whoever holds it, or None when another
    contender won the race just now (try again)."""
    now = time.time()
    latest = _latest_generation(store, name)
    if latest:
        current = _read(store, lease_path(name, latest))
        if current is not None and current.live(now) and not holder_is_gone(current.holder):
            if current.holder == holder:  # our own create whose answer was lost, retried
                return Lease(store, name, current, ttl_s)
            return current
    record = LeaseRecord(holder=holder, generation=latest + 1, acquired=now, heartbeat=now, expires=now + ttl_s)
    if store.create_exclusive(lease_path(name, record.generation), record.encode()):
        return Lease(store, name, record, ttl_s)
    return None


def acquire_unless_done(store: ArtifactStore, name: str, holder: str, done: Callable[[], bool],
                        on_wait: Callable[[LeaseRecord], None] | None = None, ttl_s: float | None = None,
                        poll_s: float = 0.5) -> Lease | None:
    """Wait until either the work is `done()` (returns None: someone else did it) or this
    holder has the lease (returns it, heartbeat running; the caller computes, then releases).
    `done` is asked again right after acquiring: the previous holder may have finished between
    our last look and its release. Honours Ctrl-C while waiting."""
    ttl_s = lease_ttl() if ttl_s is None else ttl_s
    waiting_for: str | None = None
    while True:
        raise_if_cancelled()
        if done():
            return None
        got = try_acquire(store, name, holder, ttl_s)
        if isinstance(got, Lease):
            if done():
                got.release(computed=False)
                return None
            got.start_heartbeat()
            return got
        if isinstance(got, LeaseRecord) and got.holder != waiting_for:
            waiting_for = got.holder
            if on_wait is not None:
                on_wait(got)
        if got is None:
            continue  # lost a race for a free lease: look again at once
        time.sleep(poll_s)
