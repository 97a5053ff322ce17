"""What every task opens from the run's config: the validated config, the store, the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerquant.config import RunConfig
from layerquant.errors import ArtifactCorrupt, ArtifactMissing, LayerquantError
from layerquant.infra.checkpoint import CheckpointReader
from layerquant.infra.store import ArtifactStore, open_store
from layerquant.specs import ArtifactRef


@dataclass
class RunContext:
    config: RunConfig
    store: ArtifactStore
    reader: CheckpointReader

    @classmethod
    def open(cls, config: dict[str, Any]) -> "RunContext":
        run_config = RunConfig(**config)
        return cls(run_config, open_store(run_config.store), CheckpointReader(run_config.model))

    def layer_name(self, index: int, name: str) -> str:
        return self.reader.block_prefix(index) + name


def ref_of(data: dict[str, Any]) -> ArtifactRef:
    return ArtifactRef.from_dict(data)


def cached(store: ArtifactStore, stage: str, key: str, logger=None) -> ArtifactRef | None:
    """A committed artifact whose bytes verify, or None (a corrupt one is discarded and logged)."""
    ref = store.lookup(stage, key)
    if ref is None:
        return None
    try:
        store.verified_bytes(ref)
    except (ArtifactCorrupt, ArtifactMissing) as exc:
        if logger is not None:
            logger.warning("discarding %s artifact %s: %s", stage, key[:12], exc)
        store.discard(ref)
        return None
    return ref


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry I/O and unexpected failures, not the user's own errors
    (a bad spec or model fails the same way every time; a store outage does not)."""
    try:
        state.result()
    except LayerquantError as exc:
        return exc.transient
    except Exception:  # noqa: BLE001 - anything unforeseen (network, OS) earns a retry
        return True
    return True
