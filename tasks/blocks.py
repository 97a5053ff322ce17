"""Per-block reconstruction: quantize one decoder block on its (quantized-propagated) inputs."""
from __future__ import annotations

import resource

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.block_artifact import BlockArtifact, LayerRecord
from layerquant.cancellation import raise_if_cancelled
from layerquant.config import CODE_VERSION
from layerquant.infra.checkpoint import tensors_fingerprint
from layerquant.infra.lease import acquire_unless_done, new_holder_id
from layerquant.infra.memory import release_free_memory
from layerquant.infra.store import artifact_key
from layerquant.solvers.architectures import family_norm
from layerquant.solvers.reconstruct import BlockReconstruction, quantize_block_data_free, reconstruct_block, resolve_device
from layerquant.solvers.runtime_model import RuntimeModel
from layerquant.report import merge_timings
from layerquant.specs import QuantSpec
from layerquant.tasks.context import RunContext, cached, phase, ref_of, retry_transient

BLOCK_STAGE = "block"
HIDDEN_STAGE = "hidden"


def block_key(inputs_sha: str, weights_fp: str, specs: dict[str, dict], damp_percent: float, tuning: dict, runtime: dict | None = None) -> str:
    settings = {"specs": specs, "damp": damp_percent}
    if tuning:  # absent when off: plain runs keep the keys they always had
        settings["tuning"] = tuning
    if runtime:  # activation / KV quantization and rotation, likewise absent when off
        settings["runtime_quant"] = runtime
    return artifact_key(BLOCK_STAGE, CODE_VERSION, [inputs_sha, weights_fp], settings)


# what stands in for the inputs' hash in the key of a block quantized from its weights alone
DATA_FREE = "data-free"


@task(name="reconstruct", task_run_name="block-{index:02d} / reconstruct", cache_policy=NO_CACHE,
      persist_result=False, retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=retry_transient)
def quantize_block(config: dict, index: int, inputs: dict | None, specs: dict[str, dict], force: bool = False) -> dict:
    """Returns {"block": ref, "outputs": ref or None, "cached", "timing"}; both reused if already
    in the store, unless `force`. Without `inputs` (a data-free run: round-to-nearest only) the
    block is quantized from its weights alone and has no outputs. `timing` is this call's
    seconds by phase (reading weights, store I/O, forward, hessian, solve, tuning)."""
    raise_if_cancelled()
    # free heap left by whatever ran since the last block (the flow's bookkeeping, an evaluation):
    # the block's working set then starts from the process's live memory alone
    release_free_memory()
    logger = get_run_logger()
    timing: dict[str, float] = {}
    ctx = RunContext.open(config)
    reader = ctx.reader
    with phase(timing, "read_weights"):
        # one read of the block serves both its content address and the computation
        weights = reader.block_weights(index, dtype=None)
        weights_fp = tensors_fingerprint(sorted(weights.items()))
    tuning = ctx.config.block_tuning()
    tuning_identity = tuning.identity()
    runtime = ctx.config.runtime_quant()
    model = RuntimeModel.plan(reader.arch, reader.config, runtime, tied_embeddings=not reader.has(reader.arch.lm_head_name))
    next_norm_weight = None
    if tuning.enabled and tuning.space == "next_norm":
        next_name = reader.arch.norm_reading_block_output(index, reader.n_blocks)
        next_norm_weight = model.norm_weight(reader.tensor(next_name).float())
        tuning_identity["next_norm"] = tensors_fingerprint([(next_name, next_norm_weight)])
    inputs_ref = None if inputs is None else ref_of(inputs)
    key = block_key(DATA_FREE if inputs_ref is None else inputs_ref.sha256, weights_fp, specs, ctx.config.damp_percent, tuning_identity,
                    runtime.identity())
    hit = None if force else cached_block(ctx, key, inputs_ref is None, timing, logger)
    lease = None
    if hit is None and not force:
        # another run (or worker) may be computing this very block: wait for it rather than
        # compute it twice (infra/lease.py); a forced block is recomputed whatever the store has
        def done() -> bool:
            return ctx.store.lookup(BLOCK_STAGE, key) is not None and (inputs_ref is None or ctx.store.lookup(HIDDEN_STAGE, key) is not None)

        with phase(timing, "lease_wait"):
            lease = acquire_unless_done(ctx.store, f"{BLOCK_STAGE}/{key}", new_holder_id(), done,
                                        on_wait=lambda held: logger.info("block %02d: waiting for %s, which is computing it", index, held.holder))
        if lease is None:
            hit = cached_block(ctx, key, inputs_ref is None, timing, logger)
    if hit is not None:
        del weights
        logger.info("block %02d: cached %s", index, key[:12])
        return hit | {"timing": timing}
    computed = False
    try:
        result = compute_block(ctx, index, key, weights, weights_fp, inputs_ref, specs, tuning, next_norm_weight, model, timing, logger)
        computed = True
        return result
    finally:
        if lease is not None:
            lease.release(computed)
        release_free_memory()  # the next block starts from one block's working set


def cached_block(ctx: RunContext, key: str, data_free: bool, timing: dict[str, float], logger) -> dict | None:
    """The block's artifacts (and its outputs, unless data-free) if the store has them all."""
    with phase(timing, "store_io"):
        block_hit = cached(ctx.store, BLOCK_STAGE, key, logger)
        outputs_hit = None if data_free or block_hit is None else cached(ctx.store, HIDDEN_STAGE, key, logger)
    if block_hit is None or (outputs_hit is None and not data_free):
        return None
    return {"block": block_hit.to_dict(), "outputs": None if outputs_hit is None else outputs_hit.to_dict(), "cached": True}


def compute_block(ctx: RunContext, index: int, key: str, weights: dict, weights_fp: str, inputs_ref, specs: dict[str, dict],
                  tuning, next_norm_weight, model: RuntimeModel, timing: dict[str, float], logger) -> dict:
    reader = ctx.reader
    layer_specs = {name: QuantSpec.from_dict(spec) for name, spec in specs.items()}
    float_weights = model.block_weights({name: t.float() for name, t in weights.items()})
    weights.clear()  # the caller's: float_weights (the same tensors, for float32 checkpoints) is handed on below
    if inputs_ref is None:
        with phase(timing, "solve"):
            outcomes = quantize_block_data_free(float_weights, layer_specs)
        result = BlockReconstruction(outcomes, outputs=None, output_error=None, seconds=timing["solve"], forwards=0.0)
    else:
        with phase(timing, "store_io"):
            hidden, _ = ctx.store.get_tensors(inputs_ref)
        result = reconstruct_block(
            reader.arch, reader.config, index, float_weights, hidden["hidden"], layer_specs,
            damp_percent=ctx.config.damp_percent, layer_prefix=reader.block_prefix(index), tuning=tuning,
            next_norm=None if next_norm_weight is None else family_norm(reader.arch, reader.config, next_norm_weight),
            # a gate judges the error on every sample; otherwise a subset estimates it
            full_output_error=ctx.config.gate_output_error is not None,
            device=resolve_device(ctx.config.device),
            runtime=model.block_runtime(),
            consume_weights=True,
        )
        del hidden
        timing = merge_timings(timing, result.timing)
    artifact = BlockArtifact(
        [LayerRecord.measured(o.name, o.spec, o.shape, o.error, o.damp_used, o.seconds, o.tensors) for o in result.outcomes],
        {o.name: o.tensors for o in result.outcomes},
        result.overrides,
    )
    tensors, layers = artifact.encode()
    meta = {"index": index, "weights_fp": weights_fp, "layers": layers, "output_error": result.output_error,
            "tuning": result.tuning, "seconds": round(result.seconds, 3), "stage": BLOCK_STAGE,
            "output_error_samples": result.output_error_samples, "timing": result.timing, "forwards": result.forwards}
    with phase(timing, "store_io"):
        # outputs first: a block artifact is only trusted once the inputs of the next block exist
        outputs_ref = None
        if result.outputs is not None:
            outputs_ref = ctx.store.put_tensors(HIDDEN_STAGE, key, {"hidden": result.outputs}, {"index": index + 1, "stage": HIDDEN_STAGE})
        block_ref = ctx.store.put_tensors(BLOCK_STAGE, key, tensors, meta)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worst = max(layers, key=lambda l: l["error"]) if layers else None
    logger.info(
        "block %02d: output error %s, worst layer %s %.3e, %.1fs, peak RSS %.0f MB",
        index, "n/a (data-free)" if result.output_error is None else f"{result.output_error:.3e}",
        worst["name"] if worst else "-", worst["error"] if worst else 0.0, result.seconds, peak_mb,
    )
    return {"block": block_ref.to_dict(), "outputs": None if outputs_ref is None else outputs_ref.to_dict(), "cached": False,
            "timing": {name: round(seconds, 3) for name, seconds in timing.items()}}
