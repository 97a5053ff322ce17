"""Many workers on one run: stories260K over a real Dask LocalCluster (worker processes), through
Prefect's DaskTaskRunner. The quantized model is the same to the bit with 1, 2 or 4 workers and
in one process; two workers sharing only the scheduler and an S3 endpoint (moto_server over
HTTP) both do shard work; a worker SIGKILLed mid-run changes nothing in the output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import psutil
import pytest

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from layerquant.config import RunConfig
from layerquant.flows.quantize import quantize_flow
from layerquant.infra.store import open_store
from support.s3server import MotoServer

# whole runs on a cluster of worker processes: tens of seconds each
pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

# 24 samples in batches of 8: 3 batches, so 4 shards leave one empty and 2 shards are uneven
SETTINGS = dict(bits=3, group_size=32, method="gptq", nsamples=24, seqlen=64, eval_windows=4, eval_seqlen=128)


def block_digests(store: str) -> dict[int, str]:
    """Block index -> sha256 of the block artifact's bytes (the quantized codes, scales, zeros)."""
    store = open_store(store)
    digests = {}
    for path in store.list_paths("cas/block/"):
        if path.endswith(".sha256.json"):
            record = store.lookup("block", path.rsplit("/", 1)[1].removesuffix(".sha256.json"))
            digests[record.meta["index"]] = record.sha256
    return digests


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("in-process") / "store")
    report = quantize_flow(RunConfig(store=store, **SETTINGS).model_dump())
    return report, block_digests(store)


@pytest.mark.parametrize("workers", [1, 4])
def test_one_and_four_workers_give_the_in_process_model(tmp_path, in_process, workers):
    reference, digests = in_process
    report = quantize_flow(RunConfig(store=str(tmp_path / "store"), workers=workers, **SETTINGS).model_dump())
    assert block_digests(str(tmp_path / "store")) == digests
    assert report["ppl_quant"] == reference["ppl_quant"]
    assert report["cluster"]["shards"] == workers
    assert len(report["cluster"]["workers"]) == workers  # one shard each (the fourth has no sample: its tasks are short)
    assert report["run_id"] == reference["run_id"]  # where it ran is not part of what it is


@pytest.fixture
def s3_store(monkeypatch):
    server = MotoServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3").create_bucket(Bucket="lq-cluster")
    yield "s3://lq-cluster/runs"
    server.stop()


def test_two_workers_share_only_the_scheduler_and_s3(s3_store, in_process):
    """The workers are separate processes (they inherit the S3 settings from the environment,
    as a real worker would have them); nothing but the store carries tensors between them."""
    reference, digests = in_process
    bucket, prefix = s3_store.removeprefix("s3://").split("/", 1)
    seen_partials: set[str] = set()
    running = threading.Event()
    running.set()

    def watch_partials() -> None:
        s3 = boto3.client("s3")
        while running.is_set():
            listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/cas/hessian-partial/")
            seen_partials.update(item["Key"] for item in listed.get("Contents", []) if item["Key"].endswith(".safetensors"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_partials, daemon=True)
    watcher.start()
    state = quantize_flow(RunConfig(store=s3_store, workers=2, **SETTINGS).model_dump(), return_state=True)
    running.clear()
    watcher.join(timeout=5)
    report = state.result()
    assert block_digests(s3_store) == digests
    assert report["ppl_quant"] == reference["ppl_quant"]
    # both workers did shard work: every block artifact records which workers ran its shard tasks
    store = open_store(s3_store)
    for path in store.list_paths("cas/block/"):
        if path.endswith(".sha256.json"):
            meta = store.lookup("block", path.rsplit("/", 1)[1].removesuffix(".sha256.json")).meta
            assert len(meta["shards"]["workers"]) == 2 and meta["shards"]["count"] == 2
    assert all(w.startswith("tcp://127.0.0.1:") for w in report["cluster"]["workers"])
    assert seen_partials, "the shards' Gram sums went through the S3 store"
    # and were discarded with the solved units once each block was assembled: the store keeps
    # blocks and their outputs, not one Gram sum per shard and group of every block
    assert not store.list_paths("cas/hessian-partial/") and not store.list_paths("cas/solved-unit/")
    assert report["cluster"]["pruned_intermediates"] >= len(seen_partials)
    # the workers report their task runs to the flow's own API (what the UI shows), not to a
    # temporary server of their own: every block's shard stages, both shards, are on it
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    shard_runs = {run.name for run in runs if run.name and "/ shard-" in run.name}
    assert {f"block-{b:02d} / shard-{s} / outputs" for b in range(report["n_blocks"]) for s in (0, 1)} <= shard_runs


def test_the_workers_of_a_cli_run_use_its_temporary_server(tmp_path, stories_model):
    """`layerquant quantize --workers 2` with no Prefect server configured: the CLI's temporary
    server is handed to the worker processes, none boots one of its own (which would cost each
    worker seconds of CPU and a few hundred MB, and record its task runs where no one sees them)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_API")}
    command = [sys.executable, "-m", "layerquant.cli", "quantize", "--model", stories_model, "--workers", "2", "--threads-per-worker", "1",
               "--bits", "4", "--group-size", "32", "--nsamples", "16", "--seqlen", "64", "--eval-windows", "2", "--eval-seqlen", "64",
               "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out")]
    cli = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(cli.stdout), daemon=True)
    reader.start()
    workers_seen, worker_servers = set(), set()
    while cli.poll() is None:
        try:
            descendants = psutil.Process(cli.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for process in descendants:
            try:
                if any("spawn_main" in part for part in process.cmdline()):
                    workers_seen.add(process.pid)
                elif "uvicorn" in " ".join(process.cmdline()) and process.ppid() in workers_seen:
                    worker_servers.add(process.pid)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    reader.join(timeout=10)
    assert cli.returncode == 0, "".join(lines)[-3000:]
    assert len(workers_seen) >= 2, "the run did not start its two worker processes"
    assert not worker_servers, f"worker processes booted Prefect servers of their own: {sorted(worker_servers)}"


def worker_processes() -> list[psutil.Process]:
    """This test's LocalCluster worker processes (spawned children of this process)."""
    return [child for child in psutil.Process().children(recursive=True)
            if any("spawn_main" in part or "forkserver" in part for part in child.cmdline())]


def test_a_worker_killed_mid_run_changes_nothing(tmp_path, in_process):
    reference, digests = in_process
    store = tmp_path / "store"
    killed: list[int] = []

    def kill_one_worker_mid_run() -> None:
        deadline = time.monotonic() + 300
        # mid-run: block 1's shards have started (block 0 done, paused forwards in worker memory)
        while time.monotonic() < deadline:
            blocks = list((store / "cas" / "block").rglob("*.sha256.json")) if store.exists() else []
            partials = list((store / "cas" / "hessian-partial").rglob("*.sha256.json")) if store.exists() else []
            # block 0 assembled (its own Gram sums pruned), block 1's first stage stored
            if blocks and partials and worker_processes():
                victim = worker_processes()[0]
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_mid_run, daemon=True)
    killer.start()
    report = quantize_flow(RunConfig(store=str(store), workers=2, **SETTINGS).model_dump())
    killer.join(timeout=5)
    assert killed, "the kill did not land: the test needs a worker killed mid-run"
    assert block_digests(str(store)) == digests
    assert report["ppl_quant"] == reference["ppl_quant"]
    # the lost shard's state was rebuilt from the store by another (or the restarted) worker
    assert report["cluster"]["rebuilt_shard_tasks"] >= 1 or len(report["cluster"]["workers"]) > 2



def read_initial_environment() -> bytes:
    return open("/proc/self/environ", "rb").read()


def test_local_workers_start_with_the_allocators_settings(tmp_path):
    """glibc reads MALLOC_ARENA_MAX once, when a process starts: a worker told later (Dask's
    `env`) keeps one arena per thread, whose freed buffers no other thread reuses."""
    from layerquant.flows.cluster import open_cluster

    with open_cluster(RunConfig(store=str(tmp_path / "store"), workers=1, **SETTINGS)) as cluster:
        environments = cluster.runner.client.run(read_initial_environment)
    (environment,) = environments.values()
    assert b"MALLOC_ARENA_MAX=2" in environment.split(b"\0")
