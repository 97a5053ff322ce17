"""Mixed precision: per-block Hessians and sensitivity scores on the float model, then one
integer program over all layers. Scores do not depend on the budget, so re-planning for a new
budget reuses them."""
from __future__ import annotations

import math
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from layerquant.cancellation import raise_if_cancelled
from layerquant.config import CODE_VERSION, RunConfig
from layerquant.errors import InfeasibleBudget, InvalidSpec
from layerquant.infra.checkpoint import CheckpointReader, tensors_fingerprint
from layerquant.infra.lease import acquire_unless_done, new_holder_id
from layerquant.infra.store import ArtifactStore, artifact_key, open_store
from layerquant.solvers.allocation import (Allocation, LayerOptions, allocate_bits, cheapest_finer_specs, finer_options,
                                           fit_loss_coefficient, gate_restriction, plan_size_range, predicted_perplexity)
from layerquant.solvers.granularity import auto_group_sizes, granularity_filter
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
    keys = ((HESSIAN_STAGE, hessian_key), (FLOAT_HIDDEN_STAGE, hessian_key), (SCORES_STAGE, scores_key))
    found = stored_scores(ctx, keys, logger)
    lease = None
    if found is None:
        # another run scoring the same block: wait for its result rather than score it twice (infra/lease.py)
        lease = acquire_unless_done(ctx.store, f"{SCORES_STAGE}/{scores_key}", new_holder_id(),
                                    lambda: all(ctx.store.lookup(stage, key) is not None for stage, key in keys),
                                    on_wait=lambda held: logger.info("block %02d: waiting for %s, which is scoring it", index, held.holder))
        if lease is None:
            found = stored_scores(ctx, keys, logger)
    if found is not None:
        logger.info("block %02d: scores cached", index)
        return found
    computed = False
    try:
        result = compute_scores(ctx, index, inputs, weights, hessian_key, scores_key, candidates, logger)
        computed = True
        return result
    finally:
        if lease is not None:
            lease.release(computed)


def stored_scores(ctx: RunContext, keys, logger) -> dict | None:
    """{"hessian", "outputs", "scores"} refs if the store has all three, else None."""
    refs = [cached(ctx.store, stage, key, logger) for stage, key in keys]
    if not all(refs):
        return None
    hessian_ref, outputs_ref, scores_ref = refs
    return {"scores": scores_ref.to_dict(), "outputs": outputs_ref.to_dict(), "hessian": hessian_ref.to_dict()}


def compute_scores(ctx: RunContext, index: int, inputs: dict, weights: dict, hessian_key: str, scores_key: str, candidates,
                   logger) -> dict:
    reader = ctx.reader
    hessian_ref = cached(ctx.store, HESSIAN_STAGE, hessian_key, logger)
    outputs_ref = cached(ctx.store, FLOAT_HIDDEN_STAGE, hessian_key, logger)
    started = time.perf_counter()
    float_weights = {name: t.float() for name, t in weights.items()}
    hidden = ctx.store.get_tensors(ref_of(inputs))[0]["hidden"]  # scoring needs it on every path from here
    if hessian_ref and outputs_ref:
        hessians = ctx.store.get_tensors(hessian_ref)[0]
    else:
        outputs, hessians = float_block_hessians(reader.arch, reader.config, index, float_weights, hidden)
        outputs_ref = ctx.store.put_tensors(FLOAT_HIDDEN_STAGE, hessian_key, {"hidden": outputs}, {"index": index + 1})
        hessian_ref = ctx.store.put_tensors(HESSIAN_STAGE, hessian_key, hessians, {"index": index})
    prefix = reader.block_prefix(index)
    block_scores = score_block_sensitivity(reader.arch, reader.config, index, float_weights, hidden, hessians, candidates,
                                           ctx.config.damp_percent, prefix)
    layers = [{"name": prefix + name, "shape": list(float_weights[f"{name}.weight"].shape), "scores": scores}
              for name, scores in block_scores.items()]
    scores_ref = ctx.store.put_json(SCORES_STAGE, scores_key, {"index": index, "layers": layers}, {"index": index})
    logger.info("block %02d: %d layers x %d candidates scored", index, len(layers), len(candidates))
    return {"scores": scores_ref.to_dict(), "outputs": outputs_ref.to_dict(), "hessian": hessian_ref.to_dict(),
            "timing": {"scoring": round(time.perf_counter() - started, 3)}}


@task(name="preflight", task_run_name="preflight / settings", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_transient)
def check_settings(config: dict) -> None:
    """Bad settings fail before calibration, from the checkpoint headers alone: overrides that
    name no layer, a budget outside what the candidates can reach."""
    ctx = RunContext.open(config)
    check_overrides(ctx.config, ctx.reader)
    if ctx.config.budget is not None:
        check_budget(ctx.config, ctx.reader)


def check_budget(config: RunConfig, reader) -> None:
    """Refuse a budget no plan can meet, or one above what the largest plan takes, in a second."""
    # from the candidate sizes and the checkpoint headers alone, before any data is read
    smallest, largest = plan_size_range(reader.linear_shapes(), config.candidate_specs(), config.floors, config.servable)
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
    ctx = RunContext.open(config)
    return _solved_plan(ctx, score_refs, budget, restrict)


def _solved_plan(ctx: RunContext, score_refs: list[dict], budget: float, restrict: dict[str, list[int]] | None) -> dict[str, Any]:
    """The plan as tasks hand it on: JSON specs by full layer name, and what the solve achieved."""
    allocation = solve_plan(ctx.config, ctx.store, score_refs, fused_groups(ctx.reader), restrict, ctx.reader)
    get_run_logger().info("plan for %.3f bits/weight: %.4f achieved, predicted loss %.4g, solved in %.2fs",
                          budget, allocation.avg_bits, allocation.predicted_loss, allocation.seconds)
    return {"plan": {name: spec.to_dict() for name, spec in allocation.plan.items()}, "avg_bits": allocation.avg_bits,
            "predicted_loss": allocation.predicted_loss, "solve_s": allocation.seconds, "per_layer": allocation.per_layer}


def layer_specs(config: RunConfig, reader: CheckpointReader, index: int, plan: dict[str, dict] | None) -> dict[str, dict]:
    """Block `index`'s layer specs: from the bit plan when there is one, else the config's (group
    sizes chosen per matrix under granularity "auto", unless an override sets one)."""
    prefix = reader.block_prefix(index)
    if plan is not None:
        return {name: plan[prefix + name] for name in reader.arch.linear_names}
    specs = {name: config.spec_for(prefix + name) for name in reader.arch.linear_names}
    if config.granularity == "auto":
        # data-free: the weights alone decide, so this needs no calibration pass
        chosen = auto_group_sizes(reader.block_weights(index), specs)
        specs = {name: spec if "group_size" in config.overrides.get(prefix + name, {}) else chosen[name] for name, spec in specs.items()}
    return {name: spec.to_dict() for name, spec in specs.items()}


@task(name="specs", task_run_name="block-{index:02d} / specs", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_transient)
def block_specs(config: dict, index: int, plan: dict[str, dict] | None = None) -> dict[str, dict]:
    """The specs block `index` is quantized with (see `layer_specs`); `plan`: full layer name -> spec."""
    ctx = RunContext.open(config)
    return layer_specs(ctx.config, ctx.reader, index, plan)


@task(name="gate", task_run_name="block-{index:02d} / gate", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_transient)
def replan_for_gate(config: dict, index: int, block: dict, specs: dict[str, dict], plan: dict[str, Any] | None,
                    score_refs: list[dict], used_specs: dict[str, dict]) -> dict[str, Any]:
    """What to do with block `index` (stored as `block`, quantized with `specs`) whose output
    error exceeds the gate: finer specs to redo it with, or why it is kept.

    Without a plan each layer moves to its cheapest finer candidate. With a plan the integer
    program is solved again: finished blocks keep their specs (`used_specs`, full names), this
    block's layers may only take finer candidates, and the later blocks pay for it within the
    same budget; when the budget leaves no room the block is kept.
    Returns {"action": "kept", "why"} or {"action": "redo", "specs", "plan" (the plan now in
    force, None without one), "labels_before", "labels_after"}.
    """
    ctx = RunContext.open(config)
    candidates = ctx.config.candidate_specs()
    current = {name: QuantSpec.from_dict(spec) for name, spec in specs.items()}
    artifact_meta = ref_of(block).meta
    shapes = {layer["name"]: tuple(layer["shape"]) for layer in artifact_meta["layers"]}
    finer = finer_options(current, candidates, shapes)
    if not any(finer.values()):
        return {"action": "kept", "why": "no finer candidate"}
    if plan is None:
        new_specs = {name: spec.to_dict() for name, spec in cheapest_finer_specs(current, finer, candidates).items()}
    else:
        finished = {name: QuantSpec.from_dict(spec) for name, spec in used_specs.items()}
        restrict = gate_restriction(finished, current, finer, candidates, ctx.reader.block_prefix(index))
        try:
            plan = _solved_plan(ctx, score_refs, ctx.config.budget, restrict)
        except (InfeasibleBudget, InvalidSpec) as exc:
            get_run_logger().warning("block %02d: output error %.3e over the gate %.3e, kept: the budget leaves no room",
                                     index, artifact_meta["output_error"], ctx.config.gate_output_error)
            return {"action": "kept", "why": f"the budget leaves no room ({exc.message})"}
        new_specs = layer_specs(ctx.config, ctx.reader, index, plan["plan"])
    return {"action": "redo", "specs": new_specs, "plan": plan,
            "labels_before": {name: spec.label() for name, spec in current.items()},
            "labels_after": {name: QuantSpec.from_dict(spec).label() for name, spec in new_specs.items()}}


# settings that do not change what a plan's predicted loss means for perplexity
_NOT_CALIBRATION_CONTEXT = {"budget", "gate_output_error", "max_ppl_increase", "store", "out", "pack_format"}


def _calibration_context(config: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in config.identity().items() if k not in _NOT_CALIBRATION_CONTEXT}


def higgs_coefficient(store: ArtifactStore, config: RunConfig) -> dict[str, Any] | None:
    """`fit_loss_coefficient` over the finished budget runs of this store that share the model,
    texts, windows, candidates and tuning of `config`. None until one such run has finished."""
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
    return fit_loss_coefficient(points)


@task(name="higgs-fit", task_run_name="plan / HIGGS fit", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_transient)
def fit_higgs(config: dict, ppl_fp: float, predicted_loss: float) -> dict[str, Any]:
    """The plan's perplexity prediction, calibrated on this store's earlier finished runs of the
    same setting (not on this one): {"higgs": the fit or None, "predicted_ppl": or None}."""
    run_config = RunConfig(**config)
    calibration = higgs_coefficient(open_store(run_config.store), run_config)
    return {"higgs": calibration, "predicted_ppl": predicted_perplexity(ppl_fp, predicted_loss, calibration)}
