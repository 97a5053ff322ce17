"""Calibration capture: tokens of the calibration windows and block 0's inputs."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.config import CODE_VERSION
from layerquant.infra.store import artifact_key, sha256_bytes
from layerquant.solvers.architectures import embed_tokens
from layerquant.tasks.context import RunContext, cached, retry_transient
from layerquant.tasks.token_windows import token_windows

STAGE = "calib"


@task(name="calibrate", task_run_name="calibration / capture", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=retry_transient)
def capture_calibration(config: dict) -> dict:
    logger = get_run_logger()
    ctx = RunContext.open(config)
    cfg, reader = ctx.config, ctx.reader
    windows = token_windows(ctx.store, cfg, "calibration", logger)
    embed_fp = reader.fingerprint([reader.arch.embed_name])
    key = artifact_key(STAGE, CODE_VERSION, [sha256_bytes(windows.numpy().tobytes()), embed_fp, reader.config_fingerprint()], {})
    hit = cached(ctx.store, STAGE, key, logger)
    if hit is not None:
        logger.info("calibration: cached %s", key[:12])
        return hit.to_dict()
    hidden = embed_tokens(reader.arch, reader.config, reader.embed_weight(), windows)
    ref = ctx.store.put_tensors(
        STAGE, key, {"tokens": windows, "hidden": hidden},
        meta={"nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "embed_fp": embed_fp, "stage": STAGE},
    )
    logger.info("calibration: %d x %d tokens captured (%s)", cfg.nsamples, cfg.seqlen, key[:12])
    return ref.to_dict()
