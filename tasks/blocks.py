"""Per-block reconstruction: quantize one decoder block on its (quantized-propagated) inputs."""
from __future__ import annotations

import resource

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.block_artifact import BlockArtifact, LayerRecord
from layerquant.config import CODE_VERSION
from layerquant.infra.checkpoint import tensors_fingerprint
from layerquant.cancellation import raise_if_cancelled
from layerquant.infra.store import artifact_key
from layerquant.solvers.architectures import family_norm
from layerquant.solvers.reconstruct import reconstruct_block
from layerquant.specs import QuantSpec
from layerquant.tasks.context import RunContext, cached, ref_of, retry_transient

BLOCK_STAGE = "block"
HIDDEN_STAGE = "hidden"


def block_key(inputs_sha: str, weights_fp: str, specs: dict[str, dict], damp_percent: float, tuning: dict) -> str:
    settings = {"specs": specs, "damp": damp_percent}
    if tuning:  # absent when off: plain runs keep the keys they always had
        settings["tuning"] = tuning
    return artifact_key(BLOCK_STAGE, CODE_VERSION, [inputs_sha, weights_fp], settings)


@task(name="reconstruct", task_run_name="block-{index:02d} / reconstruct", cache_policy=NO_CACHE,
      persist_result=False, retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=retry_transient)
def quantize_block(config: dict, index: int, inputs: dict, specs: dict[str, dict], force: bool = False) -> dict:
    """Returns {"block": ref, "outputs": ref}; both reused if already in the store, unless `force`."""
    raise_if_cancelled()
    logger = get_run_logger()
    ctx = RunContext.open(config)
    reader = ctx.reader
    # one read of the block serves both its content address and the computation
    weights = reader.block_weights(index, dtype=None)
    weights_fp = tensors_fingerprint(sorted(weights.items()))
    inputs_ref = ref_of(inputs)
    tuning = ctx.config.block_tuning()
    tuning_identity = tuning.identity()
    next_norm_weight = None
    if tuning.enabled and tuning.space == "next_norm":
        next_name = reader.arch.norm_reading_block_output(index, reader.n_blocks)
        next_norm_weight = reader.tensor(next_name).float()
        tuning_identity["next_norm"] = tensors_fingerprint([(next_name, next_norm_weight)])
    key = block_key(inputs_ref.sha256, weights_fp, specs, ctx.config.damp_percent, tuning_identity)
    block_hit = None if force else cached(ctx.store, BLOCK_STAGE, key, logger)
    outputs_hit = None if force else cached(ctx.store, HIDDEN_STAGE, key, logger)
    if block_hit is not None and outputs_hit is not None:
        del weights
        logger.info("block %02d: cached %s", index, key[:12])
        return {"block": block_hit.to_dict(), "outputs": outputs_hit.to_dict(), "cached": True}

    hidden, _ = ctx.store.get_tensors(inputs_ref)
    result = reconstruct_block(
        reader.arch, reader.config, index, {name: t.float() for name, t in weights.items()}, hidden["hidden"],
        {name: QuantSpec.from_dict(spec) for name, spec in specs.items()},
        damp_percent=ctx.config.damp_percent, layer_prefix=reader.block_prefix(index), tuning=tuning,
        next_norm=None if next_norm_weight is None else family_norm(reader.arch, reader.config, next_norm_weight),
        # a gate judges the error on every sample; otherwise a subset estimates it
        full_output_error=ctx.config.gate_output_error is not None,
    )
    artifact = BlockArtifact(
        [LayerRecord.measured(o.name, o.spec, o.shape, o.error, o.damp_used, o.seconds) for o in result.outcomes],
        {o.name: o.tensors for o in result.outcomes},
        result.overrides,
    )
    tensors, layers = artifact.encode()
    meta = {"index": index, "weights_fp": weights_fp, "layers": layers, "output_error": result.output_error,
            "tuning": result.tuning, "seconds": round(result.seconds, 3), "stage": BLOCK_STAGE,
            "output_error_samples": result.output_error_samples, "timing": result.timing, "forwards": result.forwards}
    # outputs first: a block artifact is only trusted once the inputs of the next block exist
    outputs_ref = ctx.store.put_tensors(HIDDEN_STAGE, key, {"hidden": result.outputs}, {"index": index + 1, "stage": HIDDEN_STAGE})
    block_ref = ctx.store.put_tensors(BLOCK_STAGE, key, tensors, meta)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logger.info(
        "block %02d: output error %.3e, worst layer %s %.3e, %.1fs, peak RSS %.0f MB",
        index, result.output_error, max(layers, key=lambda l: l["error"])["name"] if layers else "-",
        max((l["error"] for l in layers), default=0.0), result.seconds, peak_mb,
    )
    return {"block": block_ref.to_dict(), "outputs": outputs_ref.to_dict(), "cached": False}
