"""Bit allocation by integer programming (AdaQuant / HAWQ-V3): one candidate spec per layer,
minimising the summed sensitivity under a size budget that counts scales and zeros."""
from __future__ import annotations

import math
import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulp

from layerquant.errors import InfeasibleBudget, InvalidSpec
from layerquant.serving import VLLM_GROUP_SIZES, vllm_servable  # noqa: F401  (re-exported)
from layerquant.specs import QuantSpec

MIP_GAP = 1e-4  # relative optimality gap at which the solver stops


@dataclass(frozen=True)
class LayerOptions:
    name: str
    shape: tuple[int, int]  # [out_features, in_features]
    candidates: tuple[QuantSpec, ...]
    scores: tuple[float, ...]  # expected loss increase of each candidate

    @property
    def n_weights(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Allocation:
    plan: dict[str, QuantSpec]
    avg_bits: float
    total_bits: int
    predicted_loss: float
    status: str
    seconds: float
    per_layer: list[dict] = field(default_factory=list)


def grid_bits(spec: QuantSpec) -> int:
    """Bits of a spec's weight grid; PB-LLM counts as 1 (its bulk is binarized)."""
    return 1 if spec.method == "pbllm" else spec.bits


def more_generous(current: QuantSpec, candidates: Sequence[QuantSpec], shape: tuple[int, int]) -> list[int]:
    """Indices of the candidates on a finer grid than `current`, cheapest first: where a
    quality gate may send a layer whose block missed its output-error bound."""
    options = [i for i, spec in enumerate(candidates) if grid_bits(spec) > grid_bits(current)]
    return sorted(options, key=lambda i: (candidates[i].storage_bits(*shape), i))


def finer_options(specs: Mapping[str, QuantSpec], candidates: Sequence[QuantSpec],
                  shapes: Mapping[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Layer -> `more_generous` candidates (cheapest first) for every layer of a block."""
    return {name: more_generous(spec, candidates, shapes[name]) for name, spec in specs.items()}


def cheapest_finer_specs(specs: Mapping[str, QuantSpec], finer: Mapping[str, list[int]],
                         candidates: Sequence[QuantSpec]) -> dict[str, QuantSpec]:
    """Without a bit plan a gated block's layers each move to their cheapest finer candidate
    (a layer with none keeps its spec)."""
    return {name: candidates[finer[name][0]] if finer[name] else spec for name, spec in specs.items()}


def gate_restriction(finished: Mapping[str, QuantSpec], block: Mapping[str, QuantSpec], finer: Mapping[str, list[int]],
                     candidates: Sequence[QuantSpec], prefix: str) -> dict[str, list[int]]:
    """Layer -> the candidate indices it may take when the plan is solved again for a block
    over its gate: finished blocks' layers (`finished`, full names) keep their specs; the
    block's layers (`block` and `finer`, block-relative, full name = `prefix` + name) take only
    finer candidates, or keep their spec where none is finer. Later blocks stay free, so they
    pay for the block within the same budget."""
    restrict = {name: [candidates.index(spec)] for name, spec in finished.items()}
    restrict |= {prefix + name: options or [candidates.index(block[name])] for name, options in finer.items()}
    return restrict


def fit_loss_coefficient(points: Sequence[tuple[float, float]]) -> dict[str, Any] | None:
    """The factor c in ln(ppl_quant / ppl_fp) ~= c * predicted_loss (HIGGS's linearity theorem:
    the loss increase is close to a weighted sum of per-layer relative errors), least squares
    through the origin over (predicted_loss, ln(ppl_quant / ppl_fp)) of finished runs. None
    without a point."""
    if not points:
        return None
    slope = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return {"coefficient": slope, "runs": len(points)}


def predicted_perplexity(ppl_fp: float | None, predicted_loss: float, calibration: dict[str, Any] | None) -> float | None:
    if calibration is None or ppl_fp is None:
        return None
    return ppl_fp * math.exp(calibration["coefficient"] * predicted_loss)


def plan_size_range(shapes: Mapping[str, tuple[int, int]], candidates: Sequence[QuantSpec], floors: dict[str, int],
                    servable: str | None) -> tuple[float, float]:
    """The smallest and largest average bits/weight any plan over `candidates` can reach for
    layers of these shapes (full name -> [out, in]), floors and servable constraints applied."""
    candidates = tuple(candidates)
    low = high = weights = 0
    for name, shape in shapes.items():
        layer = LayerOptions(name, shape, candidates, tuple(0.0 for _ in candidates))
        costs = [candidates[i].storage_bits(*shape) for i in allowed_candidates(layer, floors, servable)]
        low, high, weights = low + min(costs), high + max(costs), weights + layer.n_weights
    return low / max(weights, 1), high / max(weights, 1)


def allowed_candidates(layer: LayerOptions, floors: dict[str, int], servable: str | None) -> list[int]:
    floor = max((bits for pattern, bits in floors.items() if re.search(pattern, layer.name)), default=0)
    keep = []
    for i, spec in enumerate(layer.candidates):
        if grid_bits(spec) < floor or (servable == "vllm" and not vllm_servable(spec)):
            continue
        keep.append(i)
    if not keep:
        raise InvalidSpec(f"no candidate of {layer.name} passes its floor / servable constraints", "add candidates or relax the floors")
    return keep


def allocate_bits(
    layers: Sequence[LayerOptions],
    budget: float,
    budget_kind: str = "avg_bits",
    tie_groups: Sequence[Sequence[str]] = (),
    floors: dict[str, int] | None = None,
    servable: str | None = None,
    solver: str = "cbc",
    restrict: Mapping[str, Collection[int]] | None = None,
) -> Allocation:
    """One-hot choice per layer minimising the summed scores subject to
    sum(storage bits) <= budget x weights (avg_bits) or budget x 8 (total_bytes).

    Layers in one tie group (fed by one input, fused by engines: q/k/v, gate/up) take the same
    candidate index, so their candidate lists must be equal. `floors` maps a regex on the layer
    name to minimum bits (e.g. {"down_proj": 3}); servable="vllm" keeps 4/8-bit grids vLLM runs.
    `restrict` maps layer names to the only candidate indices they may take (re-planning around
    layers that are already quantized, or that a quality gate sent to more generous specs).
    """
    start = time.perf_counter()
    floors = floors or {}
    by_name = {layer.name: layer for layer in layers}
    total_weights = sum(layer.n_weights for layer in layers)
    if budget_kind == "avg_bits":
        capacity = budget * total_weights
    elif budget_kind == "total_bytes":
        capacity = budget * 8
    else:
        raise InvalidSpec(f"budget kind {budget_kind!r} is unknown", "use avg_bits or total_bytes")

    allowed = {layer.name: allowed_candidates(layer, floors, servable) for layer in layers}
    for name, indices in (restrict or {}).items():
        if name in allowed:
            allowed[name] = [i for i in allowed[name] if i in set(indices)]
            if not allowed[name]:
                raise InvalidSpec(f"no allowed candidate of {name} is among the restricted ones {sorted(indices)}",
                                  "relax the floors / servable constraints or the restriction")
    cost = {layer.name: [c.storage_bits(*layer.shape) for c in layer.candidates] for layer in layers}
    groups: list[list[str]] = [list(g) for g in tie_groups if all(n in by_name for n in g)]
    tied = {n for g in groups for n in g}
    groups += [[layer.name] for layer in layers if layer.name not in tied]
    for group in groups:
        first = by_name[group[0]].candidates
        if any(by_name[n].candidates != first for n in group[1:]):
            raise InvalidSpec(f"tied layers {group} have different candidate lists", "give fused layers the same candidates")
        common = set.intersection(*(set(allowed[n]) for n in group))
        for n in group:
            allowed[n] = sorted(common)

    # the smallest achievable size: each group at its cheapest allowed common candidate
    minimum = sum(min(sum(cost[n][i] for n in group) for i in allowed[group[0]]) for group in groups)
    if minimum > capacity + 1e-6:
        smallest = minimum / total_weights if budget_kind == "avg_bits" else minimum / 8
        raise InfeasibleBudget(budget, smallest, "bits/weight" if budget_kind == "avg_bits" else "bytes")

    problem = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    choice = {
        (gi, i): problem.add_variable(f"x_{gi}_{i}", 0, 1, cat="Binary") for gi, group in enumerate(groups) for i in allowed[group[0]]
    }
    problem += pulp.lpSum(
        choice[gi, i] * sum(by_name[n].scores[i] for n in group) for gi, group in enumerate(groups) for i in allowed[group[0]]
    )
    for gi, group in enumerate(groups):
        problem += pulp.lpSum(choice[gi, i] for i in allowed[group[0]]) == 1
    problem += pulp.lpSum(
        choice[gi, i] * sum(cost[n][i] for n in group) for gi, group in enumerate(groups) for i in allowed[group[0]]
    ) <= capacity
    # proving the last 0.01% of optimality on hundreds of near-equivalent layers costs minutes;
    # a plan within MIP_GAP of the optimum is indistinguishable in perplexity
    if solver == "cbc":
        backend = pulp.PULP_CBC_CMD(msg=False, gapRel=MIP_GAP)
    elif solver == "highs":
        backend = pulp.HiGHS(msg=False, gapRel=MIP_GAP)
    else:
        raise InvalidSpec(f"solver {solver!r} is unknown", "use cbc or highs")
    problem.solve(backend)
    status = pulp.LpStatus[problem.status]
    if status != "Optimal":
        raise InfeasibleBudget(budget, minimum / total_weights if budget_kind == "avg_bits" else minimum / 8)

    plan: dict[str, QuantSpec] = {}
    per_layer = []
    total_bits = 0
    loss = 0.0
    for gi, group in enumerate(groups):
        index = next(i for i in allowed[group[0]] if choice[gi, i].value() > 0.5)
        for n in group:
            plan[n] = by_name[n].candidates[index]
            total_bits += cost[n][index]
            loss += by_name[n].scores[index]
            per_layer.append({"name": n, "spec": plan[n].label(), "bits_per_weight": cost[n][index] / by_name[n].n_weights,
                              "score": by_name[n].scores[index]})
    order = {layer.name: i for i, layer in enumerate(layers)}
    per_layer.sort(key=lambda row: order[row["name"]])
    return Allocation(plan, total_bits / total_weights, total_bits, loss, status, time.perf_counter() - start, per_layer)
