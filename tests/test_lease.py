"""Leases in the store (infra/lease.py): runs of one configuration on one store compute each
block once, the others wait; a holder that died stops blocking once its lease expires."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from layerquant.infra.lease import Lease, LeaseRecord, acquire_unless_done, lease_log, try_acquire
from layerquant.infra.store import LocalStore
from support.s3server import MotoServer

# refinement makes each stories260K block take seconds, longer than the two runs' start-up skew
SLOW_BLOCKS = ["--nsamples", "32", "--eval-windows", "4", "--refine-steps", "120", "--norm-tweak-steps", "0"]


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("moto")
    for name, value in (("AWS_ENDPOINT_URL", server.endpoint), ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    bucket = ("lq-lease-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()))[:60].rstrip("-")
    boto3.client("s3").create_bucket(Bucket=bucket)
    from layerquant.infra.s3_store import S3Store

    return S3Store(bucket, "runs-prefix")


def test_create_exclusive_lets_exactly_one_writer_win(store):
    winners = []
    barrier = threading.Barrier(4)

    def contend(name: str) -> None:
        barrier.wait()
        if store.create_exclusive("leases/x/00000001.json", name.encode()):
            winners.append(name)

    threads = [threading.Thread(target=contend, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert store.read_bytes("leases/x/00000001.json") == winners[0].encode()
    assert not store.create_exclusive("leases/x/00000001.json", b"late")


def test_a_live_lease_is_waited_for_and_an_expired_one_taken_over(store):
    first = try_acquire(store, "block/k", "alice", ttl_s=2.0)
    assert isinstance(first, Lease)
    busy = try_acquire(store, "block/k", "bob", ttl_s=2.0)
    assert isinstance(busy, LeaseRecord) and busy.holder == "alice"
    # alice dies without releasing: bob waits out her TTL, then takes generation 2
    seen = []
    started = time.monotonic()
    second = acquire_unless_done(store, "block/k", "bob", done=lambda: False, on_wait=seen.append, ttl_s=2.0, poll_s=0.1)
    assert isinstance(second, Lease) and second.record.generation == 2
    assert 1.0 < time.monotonic() - started < 6 and [r.holder for r in seen] == ["alice"]
    second.release(computed=True)
    log = lease_log(store, "block/k")
    assert [(r.holder, r.released, r.computed) for r in log] == [("alice", False, None), ("bob", True, True)]


def test_a_holder_whose_process_is_gone_is_not_waited_for(store):
    here = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    assert isinstance(try_acquire(store, "block/d", f"{here}:{dead}:0", ttl_s=3600), Lease)
    taken = try_acquire(store, "block/d", "bob", ttl_s=3600)  # at once, an hour before the lease expires
    assert isinstance(taken, Lease) and taken.record.generation == 2
    # a live process on this machine, and a holder elsewhere (bob), are judged by their heartbeat
    assert isinstance(try_acquire(store, "block/e", f"{here}:{os.getppid()}:0", ttl_s=3600), Lease)
    assert isinstance(try_acquire(store, "block/e", "carol", ttl_s=3600), LeaseRecord)
    assert isinstance(try_acquire(store, "block/d", "carol", ttl_s=3600), LeaseRecord)


def test_a_heartbeat_keeps_a_long_holding_alive_and_the_waiter_gets_the_result(store):
    # a 2 s TTL: with 1 s, one heartbeat delayed past it by a loaded machine (moto's S3 under the
    # whole suite) let bob take over in one CI run of 2026-12-04
    holder = acquire_unless_done(store, "block/h", "alice", done=lambda: False, ttl_s=2.0)
    finished = threading.Event()
    got = []
    waiter = threading.Thread(target=lambda: got.append(
        acquire_unless_done(store, "block/h", "bob", done=finished.is_set, ttl_s=2.0, poll_s=0.05)))
    waiter.start()
    time.sleep(6.0)  # three TTLs: without the heartbeat bob would have taken over
    assert waiter.is_alive()
    finished.set()  # alice's artifact is committed ...
    holder.release(computed=True)  # ... then she lets go
    waiter.join(timeout=10)
    assert got == [None]  # bob found the work done and took no lease
    assert [(r.holder, r.computed) for r in lease_log(store, "block/h")] == [("alice", True)]


# -- real CLI runs -----------------------------------------------------------------------------------
def start_cli(store: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "layerquant.cli", "quantize", *SLOW_BLOCKS, "--store", str(store), "--out", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def block_leases(store: Path) -> dict[str, list[LeaseRecord]]:
    local = LocalStore(store)
    names = {"/".join(path.split("/")[1:3]) for path in local.list_paths("leases/block")}
    return {name: lease_log(local, name) for name in names}


def files_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != "report.json"}


@pytest.mark.slow
def test_two_concurrent_identical_runs_compute_each_block_once(tmp_path):
    store = tmp_path / "store"
    runs = [start_cli(store, tmp_path / f"out-{i}") for i in range(2)]
    results = [process.communicate(timeout=600) for process in runs]
    for process, (_, err) in zip(runs, results):
        assert process.returncode == 0, err
    leases = block_leases(store)
    assert len(leases) == 5  # one lease per block key
    for name, log in leases.items():
        assert sum(1 for record in log if record.computed) == 1, (name, log)
    # the runs did overlap: one of them waited for the other's block
    assert any("waiting for" in err for _, err in results), [err[-2000:] for _, err in results]
    reports = [json.loads((tmp_path / f"out-{i}" / "report.json").read_text()) for i in range(2)]
    assert reports[0]["ppl_quant"] == reports[1]["ppl_quant"] and reports[0]["run_id"] == reports[1]["run_id"]
    assert sorted(reports[0]["blocks_cached"] + reports[1]["blocks_cached"]) == list(range(5))  # each block computed by exactly one run
    assert files_digest(tmp_path / "out-0") == files_digest(tmp_path / "out-1")


@pytest.mark.slow
def test_the_lease_of_a_sigkilled_run_is_taken_over_by_the_next_run(tmp_path):
    store = tmp_path / "store"
    # a TTL longer than the test: only the holder's process being gone lets the next run in
    killed = start_cli(store, tmp_path / "out-killed", env={"LAYERQUANT_LEASE_TTL_S": "3600"})
    deadline = time.monotonic() + 300
    held = None
    while held is None:
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
        held = next(((name, log[-1]) for name, log in block_leases(store).items() if log and not log[-1].released), None)
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # no release, no cleanup: the lease stays in the store
    killed.communicate()
    name, record = held
    assert record.holder.split(":")[1] == str(killed.pid)

    rerun = start_cli(store, tmp_path / "out")
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    log = lease_log(LocalStore(store), name)
    assert log[0].holder == record.holder and not log[0].released
    assert log[-1].computed and log[-1].generation == 2 and log[-1].holder.split(":")[1] == str(rerun.pid)
    assert log[-1].acquired < log[0].expires  # taken over at once: its holder's process is gone
