"""Gemma 3 270M: the low-bit activation grid, with float weights (rotated as QuaRot's R1-R4 are
built for Gemma 3): the signed full range the run uses (each token's value of largest magnitude on
-2**(bits-1), the scale carrying its sign; solvers/activations.fake_quant_symmetric) against
absmax / (2**(bits-1) - 1), the grid used before 2026-12-05, which leaves one code unused.

Run: .venv/bin/python bench/activation_grid.py   (about 4 minutes on 2 idle cores)
Writes bench/results/activation_grid.json: perplexity on the first 2 BOS-prefixed 2048-token
windows of the WikiText-2 test set for A3, A4 and A3 with 128-channel groups, both grids; no
weight or cache quantization, so the grid is the only difference.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import commit, conditions, machine, write_rows  # noqa: E402
from gemma_bisup import EVAL, EVAL_SEQLEN  # noqa: E402
from run_all import gemma_folder  # noqa: E402
from support.runtime_model import open_model, plan, quantize_run, run_perplexity, text_windows  # noqa: E402

import layerquant.solvers.activations as activations  # noqa: E402
from layerquant.runtime_quant import RuntimeQuant  # noqa: E402

WINDOWS = 2
SETTINGS = ((3, 0), (4, 0), (3, 128))  # (activation bits, channels per scale; 0 = one per token)


def absmax_grid(x: torch.Tensor, bits: int, group_size: int = 0, clip: torch.Tensor | None = None) -> torch.Tensor:
    """The grid before 2026-12-05: scale absmax / (2**(bits-1) - 1), codes -(2**(bits-1) - 1) .. 2**(bits-1) - 1."""
    assert clip is None, "the comparison runs without trained clipping ratios"
    groups = x.reshape(*x.shape[:-1], -1, group_size) if group_size and x.shape[-1] % group_size == 0 else x.unsqueeze(-2)
    top = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / top
    return (torch.clamp(torch.round(groups / scale), -top - 1, top) * scale).reshape(x.shape)


def main() -> None:
    reader, tokenizer = open_model(gemma_folder())
    windows = text_windows(tokenizer, str(EVAL), WINDOWS, EVAL_SEQLEN)
    full_range = activations.fake_quant_symmetric
    rows = []
    for bits, group in SETTINGS:
        for grid, quantizer in (("absmax", absmax_grid), ("signed full range", full_range)):
            start = time.perf_counter()
            # the hooks look the quantizer up in the module at call time: swap it for this case only
            activations.fake_quant_symmetric = quantizer
            try:
                model = plan(reader, RuntimeQuant(act_bits=bits, act_group_size=group, rotate=True))
                ppl = run_perplexity(reader, model, quantize_run(reader, model, None, None), windows)
            finally:
                activations.fake_quant_symmetric = full_range
            rows.append({"bench": "activation_grid", "model": "gemma-3-270m", "act_bits": bits, "act_group_size": group,
                         "grid": grid, "weights": "float, rotated", "eval_windows": WINDOWS, "eval_seqlen": EVAL_SEQLEN,
                         "ppl": ppl, "seconds": round(time.perf_counter() - start, 1),
                         "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
                         "machine": machine(), **conditions()})
            print(f"A{bits} g{group} {grid}: {ppl:.3f}", flush=True)
    print(write_rows("activation_grid", rows))


if __name__ == "__main__":
    main()
