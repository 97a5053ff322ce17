"""A deployment from prefect.yaml, triggered through the API of a real local Prefect server, is
picked up by a real process worker, completes, and its UI artifacts can be read back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support.s3server import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def prefect_api(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", "LAYERQUANT_REPO": str(REPO)}
    env.pop("PREFECT_PROFILES_PATH", None)
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    processes = [server]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "Prefect server did not start"
            time.sleep(0.5)
        yield env, processes
    finally:
        for process in reversed(processes):
            # a worker ignores one SIGTERM; SIGINT twice stops it cleanly, SIGKILL if not
            for sig in (signal.SIGINT, signal.SIGINT, signal.SIGKILL):
                if process.poll() is not None:
                    break
                os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass


@pytest.mark.slow  # its own Prefect server, a worker and a flow run in a subprocess
def test_scheduled_deployment_runs_on_a_process_worker(prefect_api, tmp_path):
    env, processes = prefect_api
    api = env["PREFECT_API_URL"]

    def cli(*args: str) -> None:
        result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr

    cli("work-pool", "create", "layerquant-pool", "--type", "process")
    cli("deploy", "--all")
    deployment = httpx.get(f"{api}/deployments/name/layerquant-recipe/nightly-stories-w3g32").json()
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    # the flow run gets the env the CLI would set
    assert deployment["job_variables"]["env"]["TOKENIZERS_PARALLELISM"] == "false"

    processes.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "layerquant-pool"], env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    out = tmp_path / "out"
    parameters = {"recipe": "recipes/stories-w3g32.yaml", "out": str(out), "store": str(tmp_path / "store"),
                  "overrides": {"nsamples": 32, "eval_windows": 8}}
    run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters}).json()
    deadline = time.monotonic() + 420
    while True:
        state = httpx.get(f"{api}/flow_runs/{run['id']}").json()["state"]
        if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            break
        assert time.monotonic() < deadline, f"deployment run stuck in {state['type']}"
        time.sleep(2)
    assert state["type"] == "COMPLETED", state
    assert (out / "report.json").exists() and list(out.glob("*.safetensors"))
    # the default output: the compressed-tensors checkpoint inference engines load
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"

    artifacts = httpx.post(f"{api}/artifacts/filter", json={}).json()
    kinds = {a["type"] for a in artifacts}
    assert {"progress", "table", "markdown"} <= kinds
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert progress[0]["data"] == 100.0
    summary = next(a for a in artifacts if a["type"] == "markdown")
    assert "quantized perplexity" in summary["data"]
    assert "Quantized against float" in summary["data"] and "top-1 agreement" in summary["data"]
    task_runs = httpx.post(f"{api}/task_runs/filter", json={}).json()
    names = {t["name"] for t in task_runs}
    assert "block-04 / reconstruct" in names and "validate / quant perplexity" in names


def manifests(store: Path) -> list[dict]:
    found = []
    for path in store.glob("runs/*/manifest.json"):
        try:
            found.append(json.loads(path.read_text()))
        except ValueError:  # replaced while read
            pass
    return found


@pytest.mark.slow  # its own Prefect server, a worker and a flow run in a subprocess
def test_a_deployment_run_cancelled_through_the_api_stops_within_seconds(prefect_api, tmp_path):
    """What the UI's Cancel button does: the run's state set to Cancelling through the API. The
    worker then stops the flow-run process; the run ends Cancelled within 10 s, its manifest says
    `cancelled`, and the finished blocks stay in the store."""
    env, processes = prefect_api
    api = env["PREFECT_API_URL"]
    for args in (("work-pool", "create", "layerquant-pool", "--type", "process"), ("deploy", "--all")):
        result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
    deployment = httpx.get(f"{api}/deployments/name/layerquant-recipe/nightly-stories-w3g32").json()
    processes.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "layerquant-pool"], env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    store = tmp_path / "store"
    # refinement makes each block take seconds: the cancel lands mid-run
    parameters = {"recipe": "recipes/stories-w3g32.yaml", "out": str(tmp_path / "out"), "store": str(store),
                  "overrides": {"nsamples": 32, "eval_windows": 4, "refine_steps": 40}}
    run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters}).json()
    deadline = time.monotonic() + 420
    while not any(len(m.get("blocks", [])) >= 1 for m in manifests(store)):
        state = httpx.get(f"{api}/flow_runs/{run['id']}").json()["state"]
        assert state["type"] in {"SCHEDULED", "PENDING", "RUNNING"} and time.monotonic() < deadline, state
        time.sleep(0.2)
    answer = httpx.post(f"{api}/flow_runs/{run['id']}/set_state", json={"state": {"type": "CANCELLING"}, "force": True})
    assert answer.status_code in (200, 201), answer.text
    asked = time.monotonic()
    # the work stops within 10 s: the flow has left its block loop and recorded why
    while not (stopped := [m for m in manifests(store) if m["status"] != "running"]):
        assert time.monotonic() - asked < 10, [m["status"] for m in manifests(store)]
        time.sleep(0.1)
    print(f"manifest {stopped[0]['status']} {time.monotonic() - asked:.1f} s after the cancel request")
    # then Prefect's own bookkeeping (engine, worker) ends the run Cancelled
    while (state := httpx.get(f"{api}/flow_runs/{run['id']}").json()["state"])["type"] != "CANCELLED":
        assert state["type"] == "CANCELLING" and time.monotonic() - asked < 60, state
        time.sleep(0.2)
    print(f"flow run Cancelled {time.monotonic() - asked:.1f} s after the cancel request")
    [manifest] = stopped
    assert manifest["status"] == "cancelled" and 1 <= len(manifest["blocks"]) < 5, manifest["status"]
    assert "TerminationSignal" in manifest["error"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))
