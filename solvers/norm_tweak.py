"""Norm tweaking (Li et al. 2023): after a block's linear layers are quantized, adjust only its
normalization weights so the quantized block's output distribution matches the float block's.

The loss is the paper's channel-wise distribution distance L_dist over a batch of outputs
[..., C]:
    L_dist = 1/C * sum_c ( |mu_f^c - mu_q^c| + |var_f^c - var_q^c| ),
mean and (population) variance of each channel over all tokens of the batch. The paper's
argument for it: matching per-channel statistics rather than every activation generalises
better from a small calibration set.

The optimizer (Adam) sees only the tensors it is given; how they enter the block (Llama's
w * x_hat or Gemma's (1 + w) * x_hat) is the caller's forward's business, so any family works.
`loss="mse"` (relative output MSE, as llmc's implementation ends up using) is offered too:
on stories260K it is the better objective after GPTQ (see `tweak_norms`).

Runs are deterministic: a seeded generator orders the samples, batches are fixed slices of that
order, and the weights returned are the best seen on the whole calibration set's loss,
including the starting weights, so tweaking can never make that loss worse.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerquant.errors import InvalidSpec
from layerquant.solvers.fitting import check_fit_args, fit_best_iterate, relative_batch_mse, sample_batches
from layerquant.tuning import BlockTuning

log = logging.getLogger(__name__)

# (weights by parameter name, hidden states [n, L, H]) -> block outputs [n, L, H]
BlockForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


# -- forwards ---------------------------------------------------------------------------------
def parameter_names(block: nn.Module, names: Iterable[str]) -> list[str]:
    """Parameter names for `names`, each either a parameter ("input_layernorm.weight") or a
    module whose `weight` is meant ("input_layernorm", as `Architecture.norms` lists them)."""
    params = dict(block.named_parameters())
    out = []
    for name in names:
        key = name if name in params else f"{name}.weight"
        if key not in params:
            raise InvalidSpec(f"block has no parameter {name!r} or {key!r}", f"its parameters are {sorted(params)}")
        out.append(key)
    return out


def norm_weights_of(block: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached float32 copies of the named norm weights, keyed by parameter name."""
    params = dict(block.named_parameters())
    return {key: params[key].detach().float().clone() for key in parameter_names(block, names)}


def functional_block_forward(block: nn.Module, names: Iterable[str], **block_kwargs: Any) -> BlockForward:
    """A `BlockForward` running `block` with the given tensors in place of its parameters.

    `names` (parameter or module names) are the parameters callers may substitute; every other
    parameter is used detached, so gradients flow only into the substituted tensors.
    `block_kwargs` are passed to every call, e.g. for a transformers 5.x decoder layer:
    `attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions`
    (`BlockContext.block_kwargs(index)` in solvers/architectures.py).
    """
    allowed = set(parameter_names(block, names))
    frozen = {key: value.detach() for key, value in block.named_parameters()}

    def forward(weights: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        unknown = set(weights) - allowed
        if unknown:
            raise InvalidSpec(f"cannot substitute {sorted(unknown)}", f"this forward substitutes {sorted(allowed)}")
        out = torch.func.functional_call(block, {**frozen, **weights}, (hidden,), block_kwargs)
        # transformers < 5 returned a tuple from decoder layers
        return out[0] if isinstance(out, tuple) else out

    return forward


# -- loss -------------------------------------------------------------------------------------
def channel_stats(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance over every token of `outputs` [..., C]."""
    flat = outputs.reshape(-1, outputs.shape[-1]).float()
    mean = flat.mean(dim=0)
    return mean, (flat - mean).pow(2).mean(dim=0)


def distribution_loss_from_stats(
    mean_q: torch.Tensor, var_q: torch.Tensor, mean_f: torch.Tensor, var_f: torch.Tensor
) -> torch.Tensor:
    return ((mean_f - mean_q).abs() + (var_f - var_q).abs()).mean()


def distribution_loss(quantized: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The paper's L_dist between two output batches [..., C] of the same tokens."""
    return distribution_loss_from_stats(*channel_stats(quantized), *channel_stats(reference))


class _StreamingStats:
    """Per-channel mean and variance over many batches, accumulated in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | float = 0.0
        self.total_sq: torch.Tensor | float = 0.0

    def add(self, outputs: torch.Tensor) -> None:
        flat = outputs.detach().reshape(-1, outputs.shape[-1]).double()
        self.n += flat.shape[0]
        self.total = self.total + flat.sum(dim=0)
        self.total_sq = self.total_sq + flat.pow(2).sum(dim=0)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.n
        return mean, (self.total_sq / self.n - mean.pow(2)).clamp(min=0)


def dataset_distribution_loss(
    block_forward: BlockForward,
    weights: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    float_outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    batch_size: int = 8,
) -> float:
    """L_dist with channel statistics over all of `inputs` (not per batch).

    `float_outputs` may be the float block's outputs or their precomputed `channel_stats`.
    """
    if isinstance(float_outputs, tuple):
        mean_f, var_f = (t.double() for t in float_outputs)
    else:
        reference = _StreamingStats()
        for start in range(0, float_outputs.shape[0], batch_size):
            reference.add(float_outputs[start : start + batch_size])
        mean_f, var_f = reference.result()
    stats = _StreamingStats()
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            stats.add(block_forward(dict(weights), inputs[start : start + batch_size]))
    return float(distribution_loss_from_stats(*stats.result(), mean_f, var_f))


def dataset_relative_mse(
    block_forward: BlockForward,
    weights: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    float_outputs: torch.Tensor,
    batch_size: int = 8,
) -> float:
    """||block(inputs) - float_outputs||^2 / ||float_outputs||^2 over all of `inputs`."""
    err = ref = 0.0
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            target = float_outputs[start : start + batch_size].double()
            out = block_forward(dict(weights), inputs[start : start + batch_size]).double()
            err += float((out - target).pow(2).sum())
            ref += float(target.pow(2).sum())
    return err / max(ref, 1e-30)


LOSSES = ("dist", "mse")


# -- optimisation -----------------------------------------------------------------------------
@dataclass
class TweakStats:
    initial_loss: float  # the loss over all calibration inputs with the given weights
    best_loss: float  # the same for the returned weights (<= initial_loss)
    best_step: int  # optimizer steps behind the returned weights; 0 = the given weights
    steps: int  # optimizer steps taken
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, dataset loss) per evaluation
    seconds: float = 0.0

    @property
    def improved(self) -> bool:
        return self.best_step > 0


def tweak_norms(
    block_forward: BlockForward,
    norm_weights: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    float_outputs: torch.Tensor,
    steps: int = 100,
    lr: float = BlockTuning.norm_tweak_lr,
    batch_size: int = BlockTuning.batch_size,
    seed: int = BlockTuning.seed,
    eval_every: int | None = None,
    loss: str = BlockTuning.norm_tweak_loss,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], TweakStats]:
    """Tweak `norm_weights` so block_forward(weights, inputs) matches `float_outputs`.

    block_forward: runs the quantized block with the given norm weights (see
        `functional_block_forward`); must be differentiable in them.
    norm_weights: parameter name -> starting tensor (not modified).
    inputs: [N, L, H] the quantized block's inputs; float_outputs: [N, L, H] the float
        block's outputs on the same tokens (the target).
    steps: optimizer steps (the whole budget: `steps` batch forwards/backwards plus
        ceil(steps / eval_every) + 1 no-grad passes over `inputs`); lr: Adam's learning rate.
    batch_size: samples per step; eval_every: steps between dataset-loss evaluations, default
        one epoch (ceil(N / batch_size)); the last step is always evaluated.
    loss: "dist", the paper's L_dist (per batch for the steps, over all of `inputs` for
        choosing the best weights); or "mse", the relative output MSE. On stories260K after
        GPTQ, "dist" lowers held-out L_dist but raises held-out output MSE and barely moves
        perplexity (2-bit g32: 30.3 -> 31.9 at lr 1e-3), while "mse" lowers both MSE and
        perplexity (30.3 -> 23.2 at lr 3e-3); with RTN both help. Hence "mse" by default.
    lr, batch_size, seed and loss default to a run's defaults (`BlockTuning`).

    validation: (inputs, float outputs) of held-out samples; when given, the best weights are
        chosen by the loss on them instead of on the training inputs, so steps that only fit
        the training samples are not kept.

    Returns (best weights seen, stats): copies in each given tensor's dtype, never worse than
    `norm_weights` on the dataset (or validation) loss.
    """
    check_fit_args(inputs, float_outputs, steps, lr, batch_size, eval_every)
    if loss not in LOSSES:
        raise InvalidSpec(f"norm-tweak loss {loss!r} is unknown", f"use one of {', '.join(LOSSES)}")
    start_time = time.perf_counter()
    n = inputs.shape[0]
    epoch = math.ceil(n / batch_size)
    eval_every = eval_every or epoch
    dtypes = {key: value.dtype for key, value in norm_weights.items()}
    params = {key: value.detach().float().clone().requires_grad_(True) for key, value in norm_weights.items()}
    reference = _StreamingStats()
    for begin in range(0, n, batch_size):
        reference.add(float_outputs[begin : begin + batch_size])
    target = reference.result()
    energy = float(reference.total_sq.sum()) / reference.n  # mean squared float output per token

    select_inputs, select_outputs = validation if validation is not None else (inputs, float_outputs)
    if validation is not None:
        check_fit_args(select_inputs, select_outputs, steps, lr, batch_size)
    select_target = target if validation is None else channel_stats(select_outputs)

    def dataset_loss(candidate: Mapping[str, torch.Tensor]) -> float:
        weights = {k: v.to(dtypes[k]) for k, v in candidate.items()}
        if loss == "dist":
            return dataset_distribution_loss(block_forward, weights, select_inputs, select_target, batch_size)
        return dataset_relative_mse(block_forward, weights, select_inputs, select_outputs, batch_size)

    def batch_objective(index: torch.Tensor) -> torch.Tensor:
        # the block sees each tensor in its own dtype; Adam keeps float32 masters
        outputs = block_forward({key: value.to(dtypes[key]) for key, value in params.items()}, inputs[index])
        if loss == "dist":
            return distribution_loss(outputs, float_outputs[index])
        return relative_batch_mse(outputs, float_outputs[index], energy)

    fit = fit_best_iterate(
        torch.optim.Adam(list(params.values()), lr=lr),
        batch_objective,
        snapshot=lambda: {key: value.detach().clone() for key, value in params.items()},
        evaluate=dataset_loss,
        batches=sample_batches(n, batch_size, steps, seed),
        eval_every=eval_every,
    )
    stats = TweakStats(fit.initial_loss, fit.best_loss, fit.best_step, steps, fit.history, time.perf_counter() - start_time)
    log.info("norm tweak (%s): %.4e -> %.4e (best at step %d of %d, %.1fs)",
             loss, fit.initial_loss, fit.best_loss, fit.best_step, steps, stats.seconds)
    return {key: value.to(dtypes[key]) for key, value in fit.best.items()}, stats
