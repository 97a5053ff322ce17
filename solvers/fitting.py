"""The Adam loop shared by block refinement (solvers/refine.py) and norm tweaking
(solvers/norm_tweak.py): seeded batches, a dataset-loss evaluation every few steps, and the best
evaluated candidate kept, starting with the unchanged one, so fitting can never make the
evaluated loss worse.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from layerquant.errors import InvalidSpec

Candidate = TypeVar("Candidate")


def check_fit_args(
    inputs: torch.Tensor, float_outputs: torch.Tensor, steps: int, lr: float, batch_size: int, eval_every: int | None = None
) -> None:
    """Refuse, with what to pass instead, arguments that no fit could use."""
    if inputs.shape[:-1] != float_outputs.shape[:-1]:
        raise InvalidSpec(
            f"inputs {tuple(inputs.shape)} and float outputs {tuple(float_outputs.shape)} do not describe the same tokens",
            "pass the float block's outputs on exactly these inputs",
        )
    if steps < 0 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise InvalidSpec(
            f"steps={steps}, lr={lr}, batch_size={batch_size} are out of range",
            "use steps >= 0, a positive finite lr and batch_size >= 1",
        )
    if eval_every is not None and eval_every < 1:
        raise InvalidSpec(f"eval_every={eval_every} is out of range", "use None (once per epoch) or a step count >= 1")


def sample_batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches for `steps` optimizer steps: each epoch a seeded permutation of the n
    samples cut into fixed slices, so a run is reproducible from (n, batch_size, steps, seed)."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=generator)
        batches.extend(order[start : start + batch_size] for start in range(0, n, batch_size))
    return batches[:steps]


def relative_batch_mse(outputs: torch.Tensor, reference: torch.Tensor, energy: float) -> torch.Tensor:
    """Mean squared output error per token over `energy`, the float outputs' mean squared norm
    per token: the training objective of both fits (scale-free, so one lr suits every block)."""
    return (outputs.float() - reference.float()).pow(2).sum(dim=-1).mean() / energy


@dataclass
class BestIterate(Generic[Candidate]):
    best: Candidate  # the candidate with the lowest evaluated loss
    initial_loss: float  # the evaluated loss of the unchanged candidate
    best_loss: float  # <= initial_loss
    best_step: int  # optimizer steps behind `best`; 0 = the unchanged candidate
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, evaluated loss) per evaluation


def fit_best_iterate(
    optimizer: torch.optim.Optimizer,
    batch_objective: Callable[[torch.Tensor], torch.Tensor],
    snapshot: Callable[[], Candidate],
    evaluate: Callable[[Candidate], float],
    batches: list[torch.Tensor],
    eval_every: int,
) -> BestIterate[Candidate]:
    """One optimizer step per index batch of `batches`, minimising batch_objective(indices).

    snapshot(): the current parameters as a detached candidate (as they would be stored);
    evaluate(candidate): its loss on the whole selection set (held-out samples or the training
    inputs). Candidates are evaluated before the first step, every `eval_every` steps and
    after the last one.
    """
    best = snapshot()
    initial = evaluate(best)
    best_loss, best_step = initial, 0
    history = [(0, initial)]
    last_step = len(batches)
    for step, indices in enumerate(batches, start=1):
        objective = batch_objective(indices)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        if step % eval_every == 0 or step == last_step:
            candidate = snapshot()
            current = evaluate(candidate)
            history.append((step, current))
            if current < best_loss:
                best, best_loss, best_step = candidate, current, step
    return BestIterate(best, initial, best_loss, best_step, history)
