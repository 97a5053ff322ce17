"""Mixed precision: per-block Hessians and sensitivity scores on the float model, then one
integer program over all layers. Scores do not depend on the budget, so re-planning for a new
budget reuses them."""
from __future__ import annotations

import math
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from layerquant.config import CODE_VERSION, RunConfig
from layerquant.errors import InfeasibleBudget, InvalidSpec
from layerquant.infra.checkpoint import CheckpointReader, tensors_fingerprint
from layerquant.cancellation import raise_if_cancelled
from layerquant.infra.store import ArtifactStore, artifact_key
from layerquant.solvers.allocation import Allocation, LayerOptions, _allowed, allocate_bits
from layerquant.solvers.granularity import granularity_filter
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
    raise_if_cancelled()
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


def linear_layer_shapes(reader) -> dict[str, tuple[int, int]]:
    """Full name -> [out, in] of every quantized linear layer, from the checkpoint headers alone."""
    shapes = {}
    for index in range(reader.n_blocks):
        for name in reader.arch.linear_names:
            full = reader.block_prefix(index) + name
            if reader.has(full + ".weight"):
                shape = reader.headers[reader.weight_map[full + ".weight"]][full + ".weight"]["shape"]
                shapes[full] = (int(shape[0]), int(shape[1]))
    return shapes


def budget_range(config: RunConfig, reader) -> tuple[float, float]:
    """The smallest and largest average bits/weight any plan over the candidates can reach
    (floors and servable constraints applied): from the candidate sizes and the layer shapes,
    before any data is read."""
    candidates = tuple(config.candidate_specs())
    low = high = weights = 0
    for name, shape in linear_layer_shapes(reader).items():
        layer = LayerOptions(name, shape, candidates, tuple(0.0 for _ in candidates))
        costs = [candidates[i].storage_bits(*shape) for i in _allowed(layer, config.floors, config.servable)]
        low, high, weights = low + min(costs), high + max(costs), weights + layer.n_weights
    return low / max(weights, 1), high / max(weights, 1)


def check_budget(config: RunConfig, reader) -> None:
    """Refuse a budget no plan can meet, or one above what the largest plan takes, in a second."""
    smallest, largest = budget_range(config, reader)
    if config.budget < smallest - 1e-9:
        raise InfeasibleBudget(config.budget, smallest)
    if config.budget > largest + 1e-9:
        raise InvalidSpec(f"budget {config.budget:g} bits/weight is above the largest candidate plan ({largest:.4f} bits/weight)",
                          f"every layer fits at its largest candidate: give a budget of at most {largest:.4f}, or drop --budget")


def check_overrides(config: RunConfig, reader) -> None:
    """Every recipe override names a quantized layer of the model (a typo would silently do nothing)."""
    import difflib

    names = [reader.block_prefix(i) + name for i in range(reader.n_blocks) for name in reader.arch.linear_names]
    for layer in config.overrides:
        if layer not in names:
            close = difflib.get_close_matches(layer, names, n=3, cutoff=0.6)
            raise InvalidSpec(f"override names the layer {layer!r}, which the model does not have",
                              f"did you mean {', '.join(close)}?" if close else f"layer names look like {names[0]}")


def granularity_restrict(reader, candidates: list[QuantSpec], tie_groups: list[list[str]]) -> dict[str, list[int]]:
    """Layer name -> the candidates whose group size is the one `choose_group_size` picks for
    that layer at the candidate's bits (layers fed by one input judged together, as engines
    fuse them); a bit-width whose pick is not among the candidates keeps all its group sizes."""
    restrict: dict[str, list[int]] = {}
    for index in range(reader.n_blocks):
        prefix = reader.block_prefix(index)
        weights = reader.block_weights(index)
        names = [prefix + name for name in reader.arch.linear_names]
        fused = [group for group in tie_groups if group[0] in names]
        grouped = {name for group in fused for name in group}
        for group in fused + [[name] for name in names if name not in grouped]:
            allowed = granularity_filter([weights[name[len(prefix):] + ".weight"] for name in group], candidates)
            restrict |= {name: allowed for name in group}
    return restrict


def solve_plan(config: RunConfig, store: ArtifactStore, score_refs: list[dict], tie_groups: list[list[str]],
               restrict: dict[str, list[int]] | None = None, reader=None) -> Allocation:
    """The integer program over every layer's stored scores (no Hessian is recomputed);
    `restrict`: layer name -> the candidate indices it may take. With granularity "auto" the
    group sizes are filtered by the data-free heuristic (`reader` supplies the weights)."""
    candidates = tuple(config.candidate_specs())
    if config.granularity == "auto":
        ties = tie_groups if config.tie_fused else []
        filtered = granularity_restrict(reader or CheckpointReader(config.model), list(candidates), ties)
        for name, allowed in (restrict or {}).items():
            filtered[name] = [i for i in filtered.get(name, allowed) if i in allowed] or list(allowed)
        restrict = filtered
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
    allocation = solve_plan(ctx.config, ctx.store, score_refs, fused_groups(ctx.reader), restrict, ctx.reader)
    logger.info("plan for %.3f bits/weight: %.4f achieved, predicted loss %.4g, solved in %.2fs",
                budget, allocation.avg_bits, allocation.predicted_loss, allocation.seconds)
    return {"plan": {name: spec.to_dict() for name, spec in allocation.plan.items()}, "avg_bits": allocation.avg_bits,
            "predicted_loss": allocation.predicted_loss, "solve_s": allocation.seconds, "per_layer": allocation.per_layer}


# settings that do not change what a plan's predicted loss means for perplexity
_NOT_CALIBRATION_CONTEXT = {"budget", "gate_output_error", "max_ppl_increase", "store", "out", "pack_format"}


def _calibration_context(config: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in config.identity().items() if k not in _NOT_CALIBRATION_CONTEXT}


def higgs_coefficient(store: ArtifactStore, config: RunConfig) -> dict[str, Any] | None:
    """The factor c in ln(ppl_quant / ppl_fp) ~= c * predicted_loss (HIGGS's linearity theorem:
    the loss increase is close to a weighted sum of per-layer relative errors), fitted through
    the origin on the finished budget runs of this store that share the model, texts, windows,
    candidates and tuning of `config`. None until one such run has finished."""
    context = _calibration_context(config)
    points = []
    for path in store.list_paths("runs"):
        if not path.endswith("/manifest.json"):
            continue
        manifest = store.read_manifest(path.split("/")[-2]) or {}
        report = manifest.get("report") or {}
        plan = report.get("plan") or {}
        if manifest.get("status") != "completed" or not plan.get("predicted_loss"):
            continue
        try:
            # compared by identity, so a setting added since (at its default) does not drop the
            # run; runs stored before tuning_space existed tuned in the residual space
            other = _calibration_context(RunConfig(**{"tuning_space": "residual", **manifest.get("config", {})}))
        except ValidationError:  # written by another version of layerquant: not comparable
            continue
        if other == context:
            points.append((plan["predicted_loss"], math.log(report["ppl_quant"] / report["ppl_fp"])))
    if not points:
        return None
    slope = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return {"coefficient": slope, "runs": len(points)}


def predicted_perplexity(ppl_fp: float | None, predicted_loss: float, calibration: dict[str, Any] | None) -> float | None:
    if calibration is None or ppl_fp is None:
        return None
    return ppl_fp * math.exp(calibration["coefficient"] * predicted_loss)
