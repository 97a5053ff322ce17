"""Re-run blocks of an existing run (failed ones, or chosen ones and everything downstream)."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from layerquant.errors import LayerquantError
from layerquant.flows.quantize import quantize_flow
from layerquant.infra.store import open_store


def load_run_config(store_location: str, run_id: str) -> dict[str, Any]:
    manifest = open_store(store_location).read_manifest(run_id)
    if manifest is None:
        raise LayerquantError(f"run {run_id} is not in the store {store_location}", "pass --store where the run wrote its artifacts")
    return manifest


@flow(name="layerquant-retry", flow_run_name="retry {run_id}", persist_result=False)
def retry_flow(run_id: str, store: str, blocks: list[int] | None = None, out: str | None = None) -> dict[str, Any]:
    """Failed blocks have no artifacts, so a plain re-run recomputes exactly them; `blocks`
    forces the chosen blocks (and their downstream) to be recomputed even if present."""
    manifest = load_run_config(store, run_id)
    config = dict(manifest["config"])
    config["store"] = store
    if out:
        config["out"] = out
    get_run_logger().info("retrying run %s (was %s), forced blocks %s", run_id, manifest.get("status"), blocks or "none")
    return quantize_flow(config, force_blocks=blocks)


@flow(name="layerquant-pack", flow_run_name="pack {run_id} as {fmt}", persist_result=False)
def pack_flow(run_id: str, store: str, fmt: str, out: str) -> str:
    """Pack a finished run from the store, without recomputing anything."""
    from layerquant.tasks.pack import pack_model

    manifest = load_run_config(store, run_id)
    if manifest.get("status") != "completed":
        raise LayerquantError(f"run {run_id} is {manifest.get('status')}, not completed", "finish it first: layerquant retry --run " + run_id)
    config = {**manifest["config"], "store": store}
    blocks = [{"block": ref} for ref in manifest["blocks"]]
    return pack_model(config, blocks, manifest["report"], fmt, out)
