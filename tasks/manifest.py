"""Run manifests: the readable per-run index in the store (status, config, finished blocks)."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from layerquant.tasks.context import retry_transient

from layerquant.infra.store import open_store


@task(name="manifest", task_run_name="manifest / {status}", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=retry_transient)
def record_manifest(store: str, run_id: str, status: str, manifest: dict) -> None:
    open_store(store).write_manifest(run_id, {"run_id": run_id, "status": status, **manifest})
