"""AdaQuant-style block refinement of quantization scales (Hubara et al. 2021).

After a block's linear layers are quantized, the integer codes stay fixed on their grid and only
the per-group scales (and, for asymmetric grids, optionally the integer zero points) are tuned
by Adam to minimise the block's output MSE against the float block's outputs. The codes are
never touched, so the result still packs into every format the original did.

Scales are optimised as multiplicative corrections s = s0 * (1 + delta), so one learning rate
suits layers whose scales differ by orders of magnitude. Zero points are optimised as real
numbers through a straight-through rounding, so the forward pass always sees integer zeros.
Every candidate is evaluated exactly as it will be stored (scales rounded to fp16, zeros to
integers on the grid), and the best candidate on the whole calibration set is returned,
starting with the unrefined one: refinement can never make the calibration MSE worse.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from layerquant.errors import InvalidSpec
from layerquant.tuning import BlockTuning
from layerquant.solvers.grid import QuantizedWeight, expand_groups, max_code
from layerquant.solvers.fitting import check_fit_args, fit_best_iterate, relative_batch_mse, sample_batches
from layerquant.solvers.norm_tweak import dataset_relative_mse

log = logging.getLogger(__name__)

# (weights by parameter name "<layer>.weight", hidden states [n, L, H]) -> block outputs
WeightForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class RefineStats:
    initial_loss: float  # relative output MSE over all calibration inputs, unrefined
    best_loss: float  # the same for the returned (stored-precision) scales, <= initial_loss
    best_step: int  # optimizer steps behind the returned scales; 0 = unrefined
    steps: int
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, dataset loss) per evaluation
    seconds: float = 0.0


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _Layer:
    """Differentiable dequantization of one layer with fixed codes."""

    def __init__(self, qw: QuantizedWeight, optimize_zeros: bool):
        self.qw = qw
        self.cols = qw.codes.shape[1]
        self.group_size = qw.spec.group_size
        self.maxq = max_code(qw.spec.bits)
        self.codes = qw.codes.float()
        self.scale0 = qw.scales.float()
        self.zero0 = qw.zeros.float()
        self.delta = torch.zeros_like(self.scale0, requires_grad=True)
        # symmetric grids have an implied zero that is not stored: it must not move
        self.zero = self.zero0.clone().requires_grad_(True) if optimize_zeros and not qw.spec.sym else None


    def _scale(self) -> torch.Tensor:
        # a scale may shrink by 99% at most: codes must keep their sign and order
        return self.scale0 * (1 + self.delta.clamp(min=-0.99))

    def _zero(self) -> torch.Tensor:
        if self.zero is None:
            return self.zero0
        return _ste_round(self.zero.clamp(0, self.maxq))

    def weight(self) -> torch.Tensor:
        scale = expand_groups(self._scale(), self.cols, self.group_size)
        zero = expand_groups(self._zero(), self.cols, self.group_size)
        return scale * (self.codes - zero)

    def stored(self) -> QuantizedWeight:
        """The current candidate at storage precision: fp16 scales, integer zeros."""
        with torch.no_grad():
            scale = self._scale().to(torch.float16).to(torch.float32)
            scale = torch.where(scale > 0, scale, self.scale0)  # an fp16 underflow keeps the old scale
            zeros = self.qw.zeros if self.zero is None else self._zero().to(torch.uint8)
        return replace(self.qw, scales=scale, zeros=zeros.clone())


def refine_scales(
    block_forward: WeightForward,
    layers: Mapping[str, QuantizedWeight],
    inputs: torch.Tensor,
    float_outputs: torch.Tensor,
    steps: int = 100,
    lr: float = BlockTuning.refine_lr,
    batch_size: int = BlockTuning.batch_size,
    seed: int = BlockTuning.seed,
    eval_every: int | None = None,
    optimize_zeros: bool = False,
    zero_lr: float = 0.02,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, QuantizedWeight], RefineStats]:
    """Tune the scales of `layers` (block-relative name -> QuantizedWeight) on block output MSE.

    block_forward(weights, hidden): runs the block with weights["<name>.weight"] in place of
        each layer's weight, differentiably (`functional_block_forward(block, names, **kwargs)`
        from solvers/norm_tweak.py with names "<name>.weight").
    inputs [N, L, H]: the quantized block's inputs; float_outputs: the float block's outputs on
        the same tokens.
    steps, lr, batch_size, seed, eval_every: as in `tweak_norms`; lr is the relative change
        of a scale per Adam step (3e-3 beat 1e-3 on every stories260K block tried).
    optimize_zeros: also tune the integer zero points of asymmetric layers, with Adam steps of
        `zero_lr` code units (a zero moves only once it crosses a rounding boundary).
    validation: (inputs, float outputs) of held-out samples that choose the best step instead
        of the training inputs.

    Returns (layers with refined fp16-exact scales, identical codes; stats). Layers are new
    `QuantizedWeight`s; the inputs are not modified.
    """
    check_fit_args(inputs, float_outputs, steps, lr, batch_size, eval_every)
    for name, qw in layers.items():
        if qw.spec.method == "pbllm":
            raise InvalidSpec(f"{name} is PB-LLM: it has no integer grid to refine", "refine only rtn/gptq layers")
    start_time = time.perf_counter()
    state = {name: _Layer(qw, optimize_zeros) for name, qw in layers.items()}
    n = inputs.shape[0]
    eval_every = eval_every or math.ceil(n / batch_size)
    # mean squared float output per token, in chunks: no float64 copy of all outputs
    energy = sum(float(float_outputs[i : i + batch_size].double().pow(2).sum()) for i in range(0, n, batch_size))
    energy /= max(1, float_outputs[..., 0].numel())

    select_inputs, select_outputs = validation if validation is not None else (inputs, float_outputs)

    def dataset_loss(candidate: Mapping[str, QuantizedWeight]) -> float:
        weights = {f"{name}.weight": qw.dequantize() for name, qw in candidate.items()}
        return dataset_relative_mse(block_forward, weights, select_inputs, select_outputs, batch_size)

    groups = [{"params": [layer.delta for layer in state.values()], "lr": lr}]
    zeros = [layer.zero for layer in state.values() if layer.zero is not None]
    if zeros:
        groups.append({"params": zeros, "lr": zero_lr})

    def batch_objective(index: torch.Tensor) -> torch.Tensor:
        weights = {f"{name}.weight": layer.weight() for name, layer in state.items()}
        outputs = block_forward(weights, inputs[index])
        return relative_batch_mse(outputs, float_outputs[index], energy)

    fit = fit_best_iterate(
        torch.optim.Adam(groups),
        batch_objective,
        snapshot=lambda: {name: layer.stored() for name, layer in state.items()},
        evaluate=dataset_loss,
        batches=sample_batches(n, batch_size, steps, seed),
        eval_every=eval_every,
    )
    stats = RefineStats(fit.initial_loss, fit.best_loss, fit.best_step, steps, fit.history, time.perf_counter() - start_time)
    log.info("scale refinement: output MSE %.4e -> %.4e (best at step %d of %d, %.1fs)",
             fit.initial_loss, fit.best_loss, fit.best_step, steps, stats.seconds)
    return fit.best, stats
