"""How fast the bit allocator solves a large model's plan: 560 layers x 12 candidates
(bits {2,3,4,8} x group {32,64,128}), like a 80-block model with 7 linears a block.

Run: .venv/bin/python bench/allocation_speed.py     Writes bench/results/allocation_speed.json.
"""
from __future__ import annotations

import random
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import conditions, machine, write_rows  # noqa: E402

from layerquant.solvers.allocation import LayerOptions, allocate_bits  # noqa: E402
from layerquant.specs import QuantSpec  # noqa: E402

CANDIDATES = tuple(QuantSpec(bits=b, group_size=g) for b in (2, 3, 4, 8) for g in (32, 64, 128))
SHAPES = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]


def instance(seed: int) -> list[LayerOptions]:
    rng = random.Random(seed)
    layers = []
    for i in range(560):
        base = rng.lognormvariate(0, 1)
        scores = tuple(base * 4.0 ** (-c.bits) * (1 + c.group_size / 512) * rng.uniform(0.8, 1.2) for c in CANDIDATES)
        layers.append(LayerOptions(f"model.layers.{i // 7}.layer{i % 7}", SHAPES[i % 7], CANDIDATES, scores))
    return layers


def main() -> int:
    rows = []
    for solver in ("cbc", "highs"):
        for budget in (2.5, 3.25, 4.25):
            at_start = conditions()
            times = [allocate_bits(instance(seed), budget, solver=solver).seconds for seed in range(3)]
            rows.append({"bench": "allocation_speed", "tool": "layerquant", "tool_version": "0.1.0", "solver": solver,
                         "layers": 560, "candidates": len(CANDIDATES), "budget": budget, "wall_s": round(statistics.median(times), 3),
                         "wall_s_max": round(max(times), 3), **at_start, "machine": machine(),
                         "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            print(f"{solver:5s} budget {budget}: median {rows[-1]['wall_s']} s, max {rows[-1]['wall_s_max']} s")
    write_rows("allocation_speed", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
