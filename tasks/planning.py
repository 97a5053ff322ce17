"""Mixed precision: per-block Hessians and sensitivity scores on the float model, then one
integer program over all layers. Scores do not depend on the budget, so re-planning for a new
budget reuses them."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.config import CODE_VERSION, RunConfig
from layerquant.infra.checkpoint import tensors_fingerprint
from layerquant.infra.store import ArtifactStore, artifact_key
from layerquant.solvers.allocation import Allocation, LayerOptions, allocate_bits
from layerquant.solvers.reconstruct import float_block_hessians
from layerquant.solvers.sensitivity import score_block_sensitivity
from layerquant.specs import QuantSpec
from layerquant.tasks.context import RunContext, cached, ref_of, retry_transient

HESSIAN_STAGE = "hessian"
FLOAT_HIDDEN_STAGE = "float-hidden"
SCORES_STAGE = "scores"


@task(name="score", task_run_name="block-{index:02d} / sensitivity", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_transient)
def score_block(config: dict, index: int, inputs: dict) -> dict:
    """Float-block Hessians (stored), float outputs (the next block's scoring inputs), and the
    score of every layer under every candidate."""
    logger = get_run_logger()
    ctx = RunContext.open(config)
    reader = ctx.reader
    weights = reader.block_weights(index, dtype=None)
    hessian_key = artifact_key(HESSIAN_STAGE, CODE_VERSION, [ref_of(inputs).sha256, tensors_fingerprint(sorted(weights.items()))], {})
    candidates = ctx.config.candidate_specs()
    scores_key = artifact_key(SCORES_STAGE, CODE_VERSION, [hessian_key], {"scorer": "block-residual-relative", "candidates": [c.to_dict() for c in candidates],
                                                                            "damp": ctx.config.damp_percent})
    hessian_ref = cached(ctx.store, HESSIAN_STAGE, hessian_key, logger)
    outputs_ref = cached(ctx.store, FLOAT_HIDDEN_STAGE, hessian_key, logger)
    scores_ref = cached(ctx.store, SCORES_STAGE, scores_key, logger)
    if hessian_ref and outputs_ref and scores_ref:
        logger.info("block %02d: scores cached", index)
        return {"scores": scores_ref.to_dict(), "outputs": outputs_ref.to_dict(), "hessian": hessian_ref.to_dict()}
    float_weights = {name: t.float() for name, t in weights.items()}
    if hessian_ref and outputs_ref:
        hessians = ctx.store.get_tensors(hessian_ref)[0]
    else:
        hidden = ctx.store.get_tensors(ref_of(inputs))[0]["hidden"]
        outputs, hessians = float_block_hessians(reader.arch, reader.config, index, float_weights, hidden)
        outputs_ref = ctx.store.put_tensors(FLOAT_HIDDEN_STAGE, hessian_key, {"hidden": outputs}, {"index": index + 1})
        hessian_ref = ctx.store.put_tensors(HESSIAN_STAGE, hessian_key, hessians, {"index": index})
    prefix = reader.block_prefix(index)
    hidden = ctx.store.get_tensors(ref_of(inputs))[0]["hidden"]
    block_scores = score_block_sensitivity(reader.arch, reader.config, index, float_weights, hidden, hessians, candidates,
                                           ctx.config.damp_percent, prefix)
    layers = [{"name": prefix + name, "shape": list(float_weights[f"{name}.weight"].shape), "scores": scores}
              for name, scores in block_scores.items()]
    scores_ref = ctx.store.put_json(SCORES_STAGE, scores_key, {"index": index, "layers": layers}, {"index": index})
    logger.info("block %02d: %d layers x %d candidates scored", index, len(layers), len(candidates))
    return {"scores": scores_ref.to_dict(), "outputs": outputs_ref.to_dict(), "hessian": hessian_ref.to_dict()}


def solve_plan(config: RunConfig, store: ArtifactStore, score_refs: list[dict], tie_groups: list[list[str]],
               restrict: dict[str, list[int]] | None = None) -> Allocation:
    """The integer program over every layer's stored scores (no Hessian is recomputed);
    `restrict`: layer name -> the candidate indices it may take."""
    candidates = tuple(config.candidate_specs())
    layers = []
    for ref in score_refs:
        for layer in store.get_json(ref_of(ref))["layers"]:
            layers.append(LayerOptions(layer["name"], tuple(layer["shape"]), candidates, tuple(layer["scores"])))
    return allocate_bits(layers, config.budget, tie_groups=tie_groups if config.tie_fused else (), floors=config.floors,
                         servable=config.servable, solver=config.ip_solver, restrict=restrict)


def fused_groups(reader) -> list[list[str]]:
    return [[reader.block_prefix(i) + name for name in group] for i in range(reader.n_blocks)
            for group in reader.arch.linear_groups if len(group) > 1]


@task(name="plan", task_run_name="plan / budget {budget}", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_transient)
def plan_bits(config: dict, score_refs: list[dict], budget: float, restrict: dict[str, list[int]] | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    ctx = RunContext.open(config)
    allocation = solve_plan(ctx.config, ctx.store, score_refs, fused_groups(ctx.reader), restrict)
    logger.info("plan for %.3f bits/weight: %.4f achieved, predicted loss %.4g, solved in %.2fs",
                budget, allocation.avg_bits, allocation.predicted_loss, allocation.seconds)
    return {"plan": {name: spec.to_dict() for name, spec in allocation.plan.items()}, "avg_bits": allocation.avg_bits,
            "predicted_loss": allocation.predicted_loss, "solve_s": allocation.seconds, "per_layer": allocation.per_layer}
