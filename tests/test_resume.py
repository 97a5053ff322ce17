"""Resumption: a run killed for real resumes from its last finished block; corrupt artifacts
are detected and recomputed; retry re-runs chosen blocks and what depends on them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from layerquant.config import RunConfig
from layerquant.flows.quantize import quantize_flow
from layerquant.flows.retry import retry_flow
from layerquant.infra.store import LocalStore
from support.checkpoints import folder_tensors

# whole quantization runs on stories260K: minutes each, so not in the fast tier
pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

SETTINGS = dict(bits=3, group_size=32, nsamples=64, seqlen=256, eval_windows=8, eval_seqlen=256)


def committed_blocks(store: Path) -> int:
    return len(list((store / "cas" / "block").rglob("*.sha256.json"))) if (store / "cas" / "block").exists() else 0


def assert_same_model(a: Path, b: Path) -> None:
    weights_a, weights_b = folder_tensors(a), folder_tensors(b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run: what every resumed or repaired run must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("reference")
    config = RunConfig(store=str(root / "store"), out=str(root / "out"), **SETTINGS)
    return quantize_flow(config.model_dump()), root / "out"


def test_sigkilled_run_resumes_from_the_last_finished_block(tmp_path, reference_run):
    reference_report, reference_out = reference_run
    store, out = tmp_path / "store", tmp_path / "out"
    command = [sys.executable, "-m", "layerquant.cli", "quantize", "--store", str(store), "--out", str(out),
               *[f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]]
    # a session of its own, so the kill takes the whole tree (its ephemeral Prefect server too)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while committed_blocks(store) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = committed_blocks(store)
    assert 2 <= finished < 5, f"kill landed after {finished} blocks; the test needs a run killed mid-way"
    assert not out.exists()

    report = quantize_flow(RunConfig(store=str(store), out=str(out), **SETTINGS).model_dump())
    # every block that had finished before the kill is reused, not recomputed
    assert set(range(finished)) <= set(report["blocks_cached"])
    assert committed_blocks(store) == 5
    assert report["ppl_quant"] == reference_report["ppl_quant"]
    assert_same_model(out, reference_out)


def test_corrupt_artifact_is_detected_and_recomputed(tmp_path, reference_run):
    reference_report, reference_out = reference_run
    config = RunConfig(store=str(tmp_path / "store"), out=str(tmp_path / "out"), **SETTINGS)
    first = quantize_flow(config.model_dump())
    store = LocalStore(tmp_path / "store")
    block_files = [p for p in store.list_paths("cas/block") if p.endswith(".safetensors")]
    hidden_files = [p for p in store.list_paths("cas/hidden") if p.endswith(".safetensors")]
    # flip bytes in one block's quantized weights, truncate another block's outputs
    victim = tmp_path / "store" / block_files[0]
    data = bytearray(victim.read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])
    victim.write_bytes(bytes(data))
    truncated = tmp_path / "store" / hidden_files[0]
    truncated.write_bytes(truncated.read_bytes()[:100])

    import json

    def block_of(path: Path) -> int:  # the commit record says which block an artifact belongs to
        record = json.loads(path.with_name(path.name.replace(".safetensors", ".sha256.json")).read_text())
        return record["meta"]["index"] - (1 if "hidden" in str(path) else 0)

    damaged = {block_of(victim), block_of(truncated)}
    second = quantize_flow(config.model_dump())
    assert first["blocks_cached"] == []
    assert damaged.isdisjoint(second["blocks_cached"])  # detected and recomputed
    assert set(second["blocks_cached"]) == set(range(5)) - damaged  # nothing else was
    assert second["ppl_quant"] == reference_report["ppl_quant"]
    assert_same_model(tmp_path / "out", reference_out)
    # and the store holds good copies again
    for path in (victim, truncated):
        assert path.exists()
    third = quantize_flow(config.model_dump())
    assert third["blocks_cached"] == [0, 1, 2, 3, 4]


def test_retry_recomputes_the_chosen_block_and_downstream(tmp_path, reference_run):
    reference_report, _ = reference_run
    config = RunConfig(store=str(tmp_path / "store"), **SETTINGS)
    first = quantize_flow(config.model_dump())
    report = retry_flow(first["run_id"], str(tmp_path / "store"), blocks=[3], out=str(tmp_path / "out"))
    assert report["blocks_cached"] == [0, 1, 2]
    assert report["ppl_quant"] == reference_report["ppl_quant"]
    assert (tmp_path / "out" / "report.json").exists()
