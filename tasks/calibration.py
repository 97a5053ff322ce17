"""Calibration capture: tokens of the calibration windows and block 0's inputs."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.config import CODE_VERSION
from layerquant.infra.checkpoint import tensors_fingerprint
from layerquant.infra.store import artifact_key, sha256_bytes
from layerquant.solvers.runtime_model import RuntimeModel
from layerquant.tasks.context import RunContext, cached, phase, retry_transient
from layerquant.tasks.token_windows import token_windows

STAGE = "calib"


@task(name="calibrate", task_run_name="calibration / capture", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=retry_transient)
def capture_calibration(config: dict) -> dict:
    """The calibration ref (tokens and block 0's inputs; meta "embed_fp": the embedding's
    fingerprint, which later tasks reuse instead of hashing it again), plus "timing"."""
    timing: dict[str, float] = {}
    with phase(timing, "calibration"):
        ref = _capture(config)
    return ref | {"timing": timing}


def _capture(config: dict) -> dict:
    logger = get_run_logger()
    ctx = RunContext.open(config)
    cfg, reader = ctx.config, ctx.reader
    windows = token_windows(ctx.store, cfg, "calibration", logger)
    # one read of the embedding serves its fingerprint and, on a miss, block 0's inputs
    embed = reader.tensor(reader.arch.embed_name)
    embed_fp = tensors_fingerprint([(reader.arch.embed_name, embed)])
    runtime = cfg.runtime_quant()
    # only the rotation changes block 0's inputs; absent without it, so plain runs keep their keys
    settings = {"rotate": runtime.identity()["rotate"]} if runtime.rotate else {}
    key = artifact_key(STAGE, CODE_VERSION, [sha256_bytes(windows.numpy().tobytes()), embed_fp, reader.config_fingerprint()], settings)
    hit = cached(ctx.store, STAGE, key, logger)
    if hit is not None:
        logger.info("calibration: cached %s", key[:12])
        return hit.to_dict()
    model = RuntimeModel.plan(reader.arch, reader.config, runtime, tied_embeddings=not reader.has(reader.arch.lm_head_name))
    hidden = model.embed(embed.float(), windows)
    ref = ctx.store.put_tensors(
        STAGE, key, {"tokens": windows, "hidden": hidden},
        meta={"nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "embed_fp": embed_fp, "stage": STAGE},
    )
    logger.info("calibration: %d x %d tokens captured (%s)", cfg.nsamples, cfg.seqlen, key[:12])
    return ref.to_dict()
