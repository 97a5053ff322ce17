"""What every task opens from the run's config: the validated config, the store, the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerquant.config import RunConfig
from layerquant.errors import ArtifactCorrupt, ArtifactMissing
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
