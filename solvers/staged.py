"""One forward per block: true-sequential reconstruction in a single pass over the samples.

True-sequential GPTQ quantizes a block's linear groups in order (q/k/v, then o, then
gate/up, then down), each on the inputs the already-quantized earlier groups produce. Done
naively, every group costs a forward from the block's start. Here each batch of samples runs
the block's own forward (the family's transformers module, unchanged) in a coroutine that
pauses at the first linear layer of every group: once every batch has reached the group, its
Hessian is complete, the group is quantized in place, and the batches resume through the
quantized layers to the next group. Stage inputs therefore stay in memory, held by the paused
forwards (one stage's activations per batch), and the block's outputs fall out at the end.

Why coroutines (greenlet) rather than a per-family split of the forward into stages: the
paused forward is transformers' own code, so rotary tables, attention interfaces, q/k norms,
Gemma 3's extra norms and sliding windows need no copy here that could drift from the model;
and unlike threads, greenlets share one thread, so grad mode and torch's thread pool behave as
in a plain call. Batches are resumed in index order and their Gram matrices summed over a fixed tree of batch
indices (solvers/hessian.PairwiseSum), so Hessians come out to the same bits as a pass that
recomputes each group's inputs from the block's start, and as shards of the batches run on
other workers and merged (`StagedShard`: the part of this pass one worker owns).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from greenlet import GreenletExit, getcurrent, greenlet
from torch import nn

from layerquant.solvers.hessian import PairwiseSum, batch_gram, hessian_from_sum

BatchForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# called once per group with (layer names, the group's input Hessian): quantizes them in place
QuantizeGroup = Callable[[Sequence[str], torch.Tensor], None]


@dataclass
class StagedPass:
    outputs: torch.Tensor  # the block's outputs with every group quantized
    seconds: dict[str, float] = field(default_factory=dict)  # forward / hessian / solve


class StagedShard:
    """Some batches of a block's forward, paused at linear groups: `run_to(g)` advances every
    batch to group g and returns the exact-order sum of their Gram matrices there; the caller
    then puts group g's quantized weights into `block` (here or, on a cluster, after merging
    every shard's sum) and asks for the next group; `finish()` gives the block's outputs.

    `first_group` > 0 starts a shard whose earlier groups are already quantized in `block`
    (rebuilding a lost shard): its batches run through them without pausing. Greenlets can only
    be switched on the thread that made them: `usable_here()` says whether this one can go on.
    """

    def __init__(self, block: nn.Module, forward: BatchForward, batches: Sequence[torch.Tensor],
                 groups: Sequence[Sequence[str]], first_group: int = 0):
        self.block = block
        self.groups = [list(g) for g in groups if g]
        self.next_group = first_group  # the group run_to expects next
        self.thread = threading.get_ident()
        self.hessian_seconds = 0.0
        self._main = getcurrent()
        self._sums = [PairwiseSum() for _ in self.groups]
        self._rows = [0] * len(self.groups)
        self._past: dict[greenlet, int] = {}  # batch -> the first group it has not reached yet
        self._handles = [block.get_submodule(name).register_forward_pre_hook(self._hook(i))
                         for i, names in enumerate(self.groups) if i >= first_group for name in names]
        self._first_group = first_group
        self._workers = [greenlet(lambda batch=batch: forward(block, batch)) for batch in batches]
        self._paused_at: list[int | None] = [None] * len(self._workers)
        self._outputs: list[torch.Tensor | None] = [None] * len(self._workers)

    def _hook(self, group_index: int):
        def pause_at_group(_module, args):
            worker = getcurrent()
            # a second layer of a group already seen by this batch, or a call from outside
            if worker is self._main or self._past.get(worker, self._first_group) > group_index:
                return
            self._past[worker] = group_index + 1
            start = time.perf_counter()
            gram, rows = batch_gram(args[0].detach())
            self._sums[group_index].add(gram)
            # the sum holds the Gram now: this frame stays alive while the batch waits, and a
            # reference here would keep every waiting batch's Gram (70 MB each at a 5632-wide
            # down_proj) alive until the group is solved
            del gram
            self._rows[group_index] += rows
            self.hessian_seconds += time.perf_counter() - start
            self._main.switch(group_index)  # wait here until the group is quantized

        return pause_at_group

    def usable_here(self) -> bool:
        return threading.get_ident() == self.thread and getcurrent() is self._main

    def _advance(self, b: int) -> None:
        result = self._workers[b].switch()
        if self._workers[b].dead:
            self._outputs[b], self._paused_at[b] = result, None
        else:
            self._paused_at[b] = result

    def _run(self, until: int | None) -> None:
        # grad mode is per thread, so every paused forward shares it: each one's no_grad exit
        # restores the mode it entered with, which must be this one (an unwound forward after
        # it would leave grad off for the caller)
        with torch.no_grad():
            for b, worker in enumerate(self._workers):
                waiting_later = until is not None and self._paused_at[b] is not None and self._paused_at[b] >= until
                if not worker.dead and not waiting_later:
                    self._advance(b)

    def run_to(self, group_index: int) -> tuple[torch.Tensor | None, int]:
        """(sum of X^T X over this shard's batches at group `group_index`'s input, row count);
        None when the shard has no batch."""
        if group_index != self.next_group:
            raise RuntimeError(f"shard is at group {self.next_group}, asked for group {group_index}")
        self._run(group_index)
        if self._workers and self._rows[group_index] == 0:
            raise RuntimeError(f"the block's forward never reached {self.groups[group_index][0]}: its group cannot be quantized")
        self.next_group = group_index + 1
        total, self._sums[group_index] = self._sums[group_index].total(), PairwiseSum()
        return total, self._rows[group_index]

    def finish(self) -> torch.Tensor | None:
        """The block's outputs on this shard's batches (None without batches); closes the shard."""
        try:
            self._run(None)
            done = [o for o in self._outputs if o is not None]
            return torch.cat(done) if done else None
        finally:
            self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if not self.usable_here():
            return  # another thread's greenlets: left to the garbage collector
        with torch.no_grad():  # the mode the paused forwards entered with, which their exits restore
            for worker in self._workers:
                if not worker.dead:  # an error left it paused: unwind its frames now, not at GC
                    worker.throw(GreenletExit)


def release_weights(block: nn.Module, names: Sequence[str]) -> None:
    """Free the named linears' weights of a block whose batches will not run through them
    with these weights: the groups not quantized yet, where the caller puts quantized weights
    in before a batch reaches them (a cluster's shards), and the groups every batch has passed."""
    with torch.no_grad():
        for name in names:
            linear = block.get_submodule(name)
            linear.weight.data = linear.weight.data.new_empty((0,) * linear.weight.dim())


def split_batches(inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [inputs[start : start + batch_size] for start in range(0, inputs.shape[0], batch_size)]


def staged_quantize(
    block: nn.Module,
    forward: BatchForward,
    inputs: torch.Tensor,
    groups: Sequence[Sequence[str]],
    quantize_group: QuantizeGroup,
    batch_size: int = 8,
    drop_passed_weights: bool = False,
) -> StagedPass:
    """Run `block` once over `inputs` [N, L, H] in batches of `batch_size`, calling
    `quantize_group(names, hessian)` for each group of `groups` (block-relative linear names
    sharing one input, in execution order) as soon as every batch has fed it.

    `drop_passed_weights`: the caller does not use the block after this pass, so a group's
    (quantized) weights are freed once every batch has passed it: at the last group the block
    holds that group's weights alone (a hidden-2048 Llama block: 46 of its 205 MB).

    `forward(block, batch)` must run one batch as one call of the block. Groups the forward
    never reaches are an error: their layers would silently stay float.
    """
    groups = [list(g) for g in groups if g]
    shard = StagedShard(block, forward, split_batches(inputs, batch_size), groups)
    solve_seconds = 0.0
    started = time.perf_counter()
    try:
        for group_index, names in enumerate(groups):
            gram_sum, rows = shard.run_to(group_index)
            if drop_passed_weights and group_index > 0:
                release_weights(block, groups[group_index - 1])
            start = time.perf_counter()
            # handed on in float32 (GPTQ factors in float32), and the float64 sum dropped before
            # the solve: next to the factorization's buffers it would be the block's largest
            # allocation (a 5632-wide down_proj: 254 MB)
            hessian = hessian_from_sum(gram_sum, rows)
            del gram_sum
            quantize_group(names, hessian)
            del hessian
            solve_seconds += time.perf_counter() - start
        outputs = shard.finish()
    finally:
        shard.close()
    total = time.perf_counter() - started
    hessian_seconds = shard.hessian_seconds
    return StagedPass(
        outputs=outputs,
        seconds={"forward": total - hessian_seconds - solve_seconds, "hessian": hessian_seconds, "solve": solve_seconds},
    )
