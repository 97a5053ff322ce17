"""The bit allocator: optimal (checked by exhaustive search), within budget counting overhead,
and clear about budgets it cannot meet."""
from __future__ import annotations

import itertools
import random

import pytest

from layerquant.errors import InfeasibleBudget
from layerquant.solvers.allocation import LayerOptions, allocate_bits
from layerquant.specs import QuantSpec

CANDIDATES = tuple(QuantSpec(bits=b, group_size=g) for b in (2, 3, 4, 8) for g in (32, 128))


def random_layers(seed: int, n: int = 5) -> list[LayerOptions]:
    rng = random.Random(seed)
    layers = []
    for i in range(n):
        shape = (rng.choice([64, 128, 256]), rng.choice([64, 128, 256]))
        base = rng.uniform(0.5, 5.0)
        # error falls ~4x per bit, finer groups help a little; noise keeps instances distinct
        scores = tuple(base * 4.0 ** (-c.bits) * (0.8 if c.group_size == 32 else 1.0) * rng.uniform(0.7, 1.3) for c in CANDIDATES)
        layers.append(LayerOptions(f"model.layers.{i // 2}.{'mlp.down_proj' if i % 2 else 'self_attn.q_proj'}", shape, CANDIDATES, scores))
    return layers


def exhaustive(layers, capacity_bits, ties=(), floor=0):
    best = None
    for combo in itertools.product(range(len(CANDIDATES)), repeat=len(layers)):
        chosen = dict(zip((l.name for l in layers), combo))
        if any(len({chosen[n] for n in group}) > 1 for group in ties):
            continue
        if any(CANDIDATES[chosen[l.name]].bits < floor and "down_proj" in l.name for l in layers):
            continue
        size = sum(CANDIDATES[chosen[l.name]].storage_bits(*l.shape) for l in layers)
        if size > capacity_bits:
            continue
        loss = sum(l.scores[chosen[l.name]] for l in layers)
        if best is None or loss < best:
            best = loss
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [2.6, 3.3, 4.2])
def test_optimum_equals_exhaustive_search(seed, budget):
    layers = random_layers(seed)
    total = sum(l.n_weights for l in layers)
    ties = [[layers[0].name, layers[2].name]]
    best = exhaustive(layers, budget * total, ties, floor=3)
    if best is None:  # the floor makes this budget impossible: the solver must say so
        with pytest.raises(InfeasibleBudget):
            allocate_bits(layers, budget, tie_groups=ties, floors={"down_proj": 3})
        return
    allocation = allocate_bits(layers, budget, tie_groups=ties, floors={"down_proj": 3})
    assert allocation.predicted_loss == pytest.approx(best, rel=1e-4)  # the solver stops at MIP_GAP = 1e-4
    assert allocation.plan[layers[0].name] == allocation.plan[layers[2].name]
    assert all(allocation.plan[l.name].bits >= 3 for l in layers if "down_proj" in l.name)


@pytest.mark.parametrize("budget", [2.2, 2.5, 3.0, 3.25, 4.0, 5.0])
@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_plan_never_exceeds_the_budget(budget, solver):
    layers = random_layers(7, n=30)
    allocation = allocate_bits(layers, budget, solver=solver)
    total = sum(l.n_weights for l in layers)
    exact = sum(allocation.plan[l.name].storage_bits(*l.shape) for l in layers) / total
    assert exact == pytest.approx(allocation.avg_bits) and exact <= budget + 1e-12
    assert exact > budget - 0.5  # it spends the budget rather than leaving bits unused


def test_infeasible_budget_names_the_smallest_achievable():
    layers = random_layers(3)
    smallest = sum(min(c.storage_bits(*l.shape) for c in CANDIDATES) for l in layers) / sum(l.n_weights for l in layers)
    with pytest.raises(InfeasibleBudget) as info:
        allocate_bits(layers, 2.0)
    assert info.value.min_achievable == pytest.approx(smallest)
    assert f"{smallest:.4f}" in str(info.value)


def test_vllm_servable_plans_use_only_4_and_8_bits():
    allocation = allocate_bits(random_layers(1, n=10), 4.5, servable="vllm")
    assert {spec.bits for spec in allocation.plan.values()} <= {4, 8}
