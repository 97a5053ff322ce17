"""Adaptive group granularity (after FineQuant, Kim et al. 2023): pick each matrix's group size
from its weights alone, with no calibration data.

FineQuant's observation: one group size does not suit every matrix. Most rows quantize well
per channel, but a matrix with outlier columns or rows of very uneven range needs fine groups,
and fine groups everywhere waste the bits their scales cost. Here each candidate group size is
judged by what it buys against what it costs: its round-to-nearest error on the matrix, with its
scale (and zero) overhead valued at the rate-distortion exchange rate of a uniform quantizer,
where one more bit per weight lowers the mean squared error 4x. The chosen size is the one with
the lowest error at that exchange rate, i.e. the one that would win at equal size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from layerquant.specs import QuantSpec

DEFAULT_GROUP_SIZES = (0, 128, 64, 32)  # 0 = one scale per output channel
MSE_PER_BIT = 4.0  # a uniform quantizer's error falls ~4x (6 dB) per extra bit per weight


def rtn_relative_error(weight: torch.Tensor, spec: QuantSpec) -> float:
    """||RTN(W) - W||^2 / ||W||^2 on the spec's grid (absmax / min-max, no clipping search)."""
    from layerquant.solvers.grid import rtn_quantize

    plain = QuantSpec(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, method="rtn", act_order=False, clip_search=False)
    w = weight.float()
    error = (rtn_quantize(w, plain).dequantize() - w).pow(2).sum()
    return float(error / w.pow(2).sum().clamp(min=1e-30))


def overhead_bits_per_weight(spec: QuantSpec, shape: tuple[int, int]) -> float:
    rows, cols = shape
    return spec.storage_bits(rows, cols) / (rows * cols) - spec.bits


def granularity_scores(weight: torch.Tensor, bits: int, sym: bool = True,
                       group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES) -> dict[int, float]:
    """Group size -> RTN error scaled by MSE_PER_BIT ** (overhead bits per weight): lower wins."""
    shape = tuple(weight.shape)
    scores = {}
    for size in group_sizes:
        if size and size >= shape[1]:
            continue  # a group as wide as the row is per-channel; scored as 0
        spec = QuantSpec(bits=bits, group_size=size, sym=sym, method="rtn", act_order=False, clip_search=False)
        scores[size] = rtn_relative_error(weight, spec) * MSE_PER_BIT ** overhead_bits_per_weight(spec, shape)
    return scores


def choose_group_size(weight: torch.Tensor, bits: int, sym: bool = True,
                      group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES) -> int:
    """The group size for `weight` [out, in] at `bits` (0 = per channel); ties go to the coarser."""
    scores = granularity_scores(weight, bits, sym, group_sizes)
    if not scores:
        return 0
    coarse_first = sorted(scores, key=lambda size: size or float("inf"), reverse=True)
    return min(coarse_first, key=lambda size: scores[size])


def granularity_filter(weight: torch.Tensor | Sequence[torch.Tensor], candidates: Sequence[QuantSpec]) -> list[int]:
    """Indices of the candidates worth scoring for `weight`: for each grid (method, bits, sym),
    only the group size `choose_group_size` picks among that grid's candidate sizes. PB-LLM
    candidates, and grids whose pick is not among their sizes, are all kept. A sequence of
    matrices fed by one input (q/k/v, gate/up) is judged as the fused matrix engines run."""
    if not isinstance(weight, torch.Tensor):
        weight = torch.cat(list(weight))
    picks: dict[tuple, int] = {}
    for spec in candidates:
        grid = (spec.method, spec.bits, spec.sym)
        if spec.method != "pbllm" and grid not in picks:
            sizes = sorted({c.group_size for c in candidates if (c.method, c.bits, c.sym) == grid})
            picks[grid] = choose_group_size(weight, spec.bits, spec.sym, sizes)
    keep = []
    for i, spec in enumerate(candidates):
        grid = (spec.method, spec.bits, spec.sym)
        sizes = {c.group_size for c in candidates if (c.method, c.bits, c.sym) == grid}
        if spec.method == "pbllm" or spec.group_size == picks[grid] or picks[grid] not in sizes:
            keep.append(i)
    return keep


def auto_group_sizes(weights: dict[str, torch.Tensor], specs: dict[str, QuantSpec]) -> dict[str, QuantSpec]:
    """`specs` (layer -> spec) with each grid layer's group size chosen from its weight
    (`weights` keyed "<layer>.weight"); PB-LLM specs are kept as they are."""
    return {
        name: spec if spec.method == "pbllm"
        else replace(spec, group_size=choose_group_size(weights[f"{name}.weight"], spec.bits, spec.sym))
        for name, spec in specs.items()
    }
