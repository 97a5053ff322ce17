"""A block's staged pass split into data-parallel shards (calibration samples cut into aligned
runs of batches, solvers/hessian.shard_batches), for a cluster's workers: each shard runs its
own batches to a group and hands back its exact-order Gram sum; the sums merge to the same
Hessian to the bit as one process computes; the group's solve units are solved from it
(in row chunks, `solve_unit_rows`, as the in-process path solves them); the quantized weights go back into each
shard's block and its batches go on.

Pure: tensors in, tensors out. Where shard state lives and how sums travel is the task layer's
business (tasks/shards.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from layerquant.solvers.architectures import BlockContext, build_block, run_block
from layerquant.solvers.hessian import GramPanels, hessian_from_sum, merge_partials, shard_batches
from layerquant.solvers.reconstruct import relative_output_error
from layerquant.solvers.staged import StagedShard, release_weights, split_batches


def shard_sample_ranges(n_samples: int, batch_size: int, n_shards: int) -> list[tuple[int, int]]:
    """[start, stop) of the calibration samples each shard owns: whole batches, aligned runs."""
    n_batches = -(-n_samples // batch_size)
    ranges = []
    for shard in range(n_shards):
        batches = shard_batches(n_batches, n_shards, shard)
        ranges.append((min(batches.start * batch_size, n_samples), min(batches.stop * batch_size, n_samples)))
    return ranges


def set_weights(block: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put quantized (dequantized) weights into the named linears, as the in-process pass does
    (the given tensors themselves when they have the block's dtype: they are the caller's to give)."""
    with torch.no_grad():
        for name, weight in weights.items():
            linear = block.get_submodule(name)
            linear.weight.data = weight.to(linear.weight.dtype).contiguous()


def start_shard(arch, config, index: int, float_weights: dict[str, torch.Tensor], inputs: torch.Tensor,
                groups: Sequence[Sequence[str]], solved: dict[str, torch.Tensor], first_group: int,
                batch_size: int = 8) -> StagedShard:
    """A shard of block `index` over `inputs` (its own samples), whose groups before
    `first_group` are already quantized (`solved`: their dequantized weights). Started at any
    group it reaches the same bits as one that ran from group 0: pausing changes nothing."""
    context = BlockContext(arch, config, seq_len=max(1, inputs.shape[1]))  # an empty shard has no length
    block = build_block(arch, config, index, float_weights)
    set_weights(block, solved)
    # true-sequential: a batch reaches a group only once it is quantized (`set_weights` first),
    # so the float weights of the groups still to solve are never used here; dropped, a paused
    # shard holds at most the group it is passing, not the whole block
    release_weights(block, [name for group in groups[first_group:] for name in group])

    def forward(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_block(module, context, index, hidden, batch_size)

    return StagedShard(block, forward, split_batches(inputs, batch_size), groups, first_group)


def merged_hessian(run: Sequence[str], partials: Iterable[torch.Tensor | GramPanels | None], rows: int,
                   owned: bool = False) -> torch.Tensor:
    """The group's Hessian from the shards' Gram sums (merged in shard order, see
    `merge_partials` for `owned`), handed on in float32 as the in-process pass hands it to the
    solver."""
    total = merge_partials(partials, owned)
    if total is None:
        raise RuntimeError(f"no shard fed {run[0]}: its group cannot be quantized")
    return hessian_from_sum(total, rows)


def float_output_error(arch, config, index: int, float_weights: dict[str, torch.Tensor], inputs: torch.Tensor,
                       quantized_outputs: torch.Tensor, batch_size: int = 8) -> float:
    """Relative output error of the quantized block against the float one on `inputs` (the
    first samples: the in-process path's estimate on the same samples)."""
    context = BlockContext(arch, config, seq_len=inputs.shape[1])
    block = build_block(arch, config, index, float_weights)
    with torch.no_grad():
        reference = run_block(block, context, index, inputs, batch_size)
    return relative_output_error(reference, quantized_outputs[: inputs.shape[0]])
