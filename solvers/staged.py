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
in a plain call. Batches are resumed in index order, so Hessians accumulate in the same order
(and to the same bits) as a pass that recomputes each group's inputs from the block's start.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from greenlet import GreenletExit, getcurrent, greenlet
from torch import nn

from layerquant.solvers.hessian import accumulate_hessian

BatchForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# called once per group with (layer names, the group's input Hessian): quantizes them in place
QuantizeGroup = Callable[[Sequence[str], torch.Tensor], None]


@dataclass
class StagedPass:
    outputs: torch.Tensor  # the block's outputs with every group quantized
    seconds: dict[str, float] = field(default_factory=dict)  # forward / hessian / solve


def staged_quantize(
    block: nn.Module,
    forward: BatchForward,
    inputs: torch.Tensor,
    groups: Sequence[Sequence[str]],
    quantize_group: QuantizeGroup,
    batch_size: int = 8,
) -> StagedPass:
    """Run `block` once over `inputs` [N, L, H] in batches of `batch_size`, calling
    `quantize_group(names, hessian)` for each group of `groups` (block-relative linear names
    sharing one input, in execution order) as soon as every batch has fed it.

    `forward(block, batch)` must run one batch as one call of the block. Groups the forward
    never reaches are an error: their layers would silently stay float.
    """
    groups = [list(g) for g in groups if g]
    main = getcurrent()
    accumulated: list[tuple[torch.Tensor | None, int]] = [(None, 0)] * len(groups)
    next_group: dict[greenlet, int] = {}
    hessian_seconds = 0.0

    def make_hook(group_index: int):
        def pause_at_group(_module, args):
            nonlocal hessian_seconds
            worker = getcurrent()
            # a second layer of a group already seen by this batch, or a call from outside
            if worker is main or next_group.get(worker, 0) > group_index:
                return
            next_group[worker] = group_index + 1
            start = time.perf_counter()
            hessian, seen = accumulated[group_index]
            accumulated[group_index] = accumulate_hessian(hessian, seen, args[0].detach())
            hessian_seconds += time.perf_counter() - start
            main.switch(group_index)  # wait here until the group is quantized

        return pause_at_group

    handles = [block.get_submodule(name).register_forward_pre_hook(make_hook(i))
               for i, names in enumerate(groups) for name in names]
    batches = [inputs[start : start + batch_size] for start in range(0, inputs.shape[0], batch_size)]
    workers = [greenlet(lambda batch=batch: forward(block, batch)) for batch in batches]
    paused_at: list[int | None] = [None] * len(workers)
    outputs: list[torch.Tensor | None] = [None] * len(workers)
    solve_seconds = 0.0
    started = time.perf_counter()

    def advance(b: int) -> None:
        result = workers[b].switch()
        if workers[b].dead:
            outputs[b], paused_at[b] = result, None
        else:
            paused_at[b] = result

    # grad mode is per thread, so every paused forward shares it: each one's no_grad exit
    # restores the mode it entered with, which must be this one (an unwound forward after
    # it would leave grad off for the caller)
    with torch.no_grad():
        try:
            for group_index, names in enumerate(groups):
                for b in range(len(workers)):
                    waiting_later = paused_at[b] is not None and paused_at[b] >= group_index
                    if not workers[b].dead and not waiting_later:
                        advance(b)
                hessian = accumulated[group_index][0]
                if hessian is None:
                    raise RuntimeError(f"the block's forward never reached {names[0]}: its group cannot be quantized")
                accumulated[group_index] = (None, 0)
                start = time.perf_counter()
                # handed on in float32: GPTQ factors in float32, and a float64 copy next to the
                # factorization would double a block's peak memory
                quantize_group(names, hessian.to(torch.float32))
                solve_seconds += time.perf_counter() - start
                del hessian
            for b in range(len(workers)):
                if not workers[b].dead:
                    advance(b)
        finally:
            for handle in handles:
                handle.remove()
            for worker in workers:
                if not worker.dead:  # an error left it paused: unwind its frames now, not at GC
                    worker.throw(GreenletExit)
    total = time.perf_counter() - started
    return StagedPass(
        outputs=torch.cat(outputs),
        seconds={"forward": total - hessian_seconds - solve_seconds, "hessian": hessian_seconds, "solve": solve_seconds},
    )
