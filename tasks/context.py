"""What every task opens from the run's config: the validated config, the store, the model."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from layerquant.config import RunConfig
from layerquant.errors import ArtifactCorrupt, ArtifactMissing, LayerquantError
from layerquant.infra.checkpoint import CheckpointReader
from layerquant.infra.memory import tune_allocator
from layerquant.infra.store import ArtifactStore, open_store
from layerquant.kernels.formats import dequantize_packed
from layerquant.specs import ArtifactRef


@dataclass
class RunContext:
    config: RunConfig
    store: ArtifactStore
    reader: CheckpointReader

    @classmethod
    def open(cls, config: dict[str, Any]) -> "RunContext":
        run_config = RunConfig(**config)
        reader = CheckpointReader(run_config.model, unpack_layers=dequantize_packed)
        # deployment and Dask worker processes never run the CLI (which sets the large-model
        # default before the model is known); the threshold follows the model's block size
        tune_allocator(reader.block_float32_bytes())
        return cls(run_config, open_store(run_config.store), reader)

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


# OSErrors that say something about the request, not the weather: retrying cannot help
_DETERMINISTIC_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised `exc` may succeed: a typed error says so
    itself (a store outage does, a bad spec or model does not); I/O errors (connections,
    timeouts, a flaky disk) do, except those about the path itself; anything else is a bug or
    bad input that fails the same way every time."""
    if isinstance(exc, LayerquantError):
        return exc.transient
    if isinstance(exc, _DETERMINISTIC_OS_ERRORS):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError))


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures only (see `is_transient`); a
    deterministic bug is not recomputed three times."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified, not swallowed: the state keeps it
        return is_transient(exc)
    return False


@contextmanager
def phase(timing: dict[str, float], name: str):
    """Add the seconds spent in the `with` body to `timing[name]` (a report's time split)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - start
