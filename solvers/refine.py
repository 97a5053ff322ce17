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

With `lowrank_rank` r > 0 (BiSup's parameter-efficient fine-tuning adds a small trainable set to
the quantized model), each layer also trains a rank-r correction added to its dequantized
weight, W = scale * (codes - zero) + A B, A [out, r], B [r, in], stored as float16 factors
(16 r (out + in) bits, counted in the layer's storage). A starts at zero (the first candidate
is the unrefined layer) and B at random rows of norm ~1; the product is scaled by the layer's
weight RMS so that `lowrank_lr` is a relative step, as the scales' lr is.
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
    # layer -> its low-rank correction's float16 factors (A, B), chosen with the returned scales;
    # empty without lowrank_rank. All zero A when the unrefined candidate was the best
    corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    live: dict[str, torch.Tensor] = field(default_factory=dict)  # the chosen values of `live_params`


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _Layer:
    """Differentiable dequantization of one layer with fixed codes (and its low-rank correction)."""

    def __init__(self, qw: QuantizedWeight, optimize_zeros: bool, lowrank_rank: int = 0, generator: torch.Generator | None = None):
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
        self.lowrank_a = self.lowrank_b = None
        if lowrank_rank:
            out_features = self.codes.shape[0]
            rank = min(lowrank_rank, out_features, self.cols)
            with torch.no_grad():
                self.rms = float(qw.dequantize().float().pow(2).mean().sqrt().clamp(min=1e-8))
            device = self.codes.device
            self.lowrank_a = torch.zeros(out_features, rank, device=device, requires_grad=True)
            # drawn on the host: the same factors wherever the block is computed
            start = torch.randn(rank, self.cols, generator=generator, device="cpu") / math.sqrt(rank)
            self.lowrank_b = start.to(device).requires_grad_(True)

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
        weight = scale * (self.codes - zero)
        if self.lowrank_a is not None:
            weight = weight + (self.rms * self.lowrank_a) @ self.lowrank_b
        return weight

    def stored_correction(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The correction's factors as stored: float16, the RMS scale folded into A."""
        if self.lowrank_a is None:
            return None
        with torch.no_grad():
            return (self.rms * self.lowrank_a).to(torch.float16), self.lowrank_b.detach().to(torch.float16)

    def stored(self) -> QuantizedWeight:
        """The current candidate at storage precision: fp16 scales, integer zeros."""
        with torch.no_grad():
            scale = self._scale().to(torch.float16).to(torch.float32)
            scale = torch.where(scale != 0, scale, self.scale0)  # an fp16 underflow keeps the old scale
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
    lowrank_rank: int = 0,
    lowrank_lr: float = BlockTuning.lowrank_lr,
    live_params: Mapping[str, torch.Tensor] | None = None,
    live_lr: float = BlockTuning.act_clip_lr,
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
    lowrank_rank, lowrank_lr: train a rank-r correction per layer with the scales (module doc);
        the chosen factors are in `stats.corrections`.
    live_params, live_lr: further tensors trained with the scales that `block_forward` reads by
        reference rather than as arguments (the activation clipping ratios its run-time hooks
        hold); each candidate is evaluated with its values put in place, and the best ones are
        left in place at the end (also in `stats.live`).

    Returns (layers with refined fp16-exact scales, identical codes; stats). Layers are new
    `QuantizedWeight`s; the inputs are not modified.
    """
    check_fit_args(inputs, float_outputs, steps, lr, batch_size, eval_every)
    for name, qw in layers.items():
        if qw.spec.method == "pbllm":
            raise InvalidSpec(f"{name} is PB-LLM: it has no integer grid to refine", "refine only rtn/gptq layers")
    start_time = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    state = {name: _Layer(qw, optimize_zeros, lowrank_rank, generator) for name, qw in layers.items()}
    n = inputs.shape[0]
    eval_every = eval_every or math.ceil(n / batch_size)
    # mean squared float output per token, in chunks: no float64 copy of all outputs
    energy = sum(float(float_outputs[i : i + batch_size].double().pow(2).sum()) for i in range(0, n, batch_size))
    energy /= max(1, float_outputs[..., 0].numel())

    select_inputs, select_outputs = validation if validation is not None else (inputs, float_outputs)

    live = dict(live_params or {})

    def put_live(values: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, value in values.items():
                live[key].copy_(value)

    def dataset_loss(candidate) -> float:
        layer_candidates, live_values = candidate
        weights = {f"{name}.weight": corrected_weight(qw, correction) for name, (qw, correction) in layer_candidates.items()}
        current = {key: value.detach().clone() for key, value in live.items()}
        put_live(live_values)
        try:
            return dataset_relative_mse(block_forward, weights, select_inputs, select_outputs, batch_size)
        finally:
            put_live(current)

    groups = [{"params": [layer.delta for layer in state.values()], "lr": lr}]
    factors = [t for layer in state.values() if layer.lowrank_a is not None for t in (layer.lowrank_a, layer.lowrank_b)]
    if factors:
        groups.append({"params": factors, "lr": lowrank_lr})
    if live:
        groups.append({"params": list(live.values()), "lr": live_lr})
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
        snapshot=lambda: ({name: (layer.stored(), layer.stored_correction()) for name, layer in state.items()},
                          {key: value.detach().clone() for key, value in live.items()}),
        evaluate=dataset_loss,
        batches=sample_batches(n, batch_size, steps, seed),
        eval_every=eval_every,
    )
    best_layers, best_live = fit.best
    put_live(best_live)
    stats = RefineStats(fit.initial_loss, fit.best_loss, fit.best_step, steps, fit.history, time.perf_counter() - start_time,
                        {name: correction for name, (_, correction) in best_layers.items() if correction is not None}, best_live)
    log.info("scale refinement: output MSE %.4e -> %.4e (best at step %d of %d, %.1fs)",
             fit.initial_loss, fit.best_loss, fit.best_step, steps, stats.seconds)
    return {name: qw for name, (qw, _) in best_layers.items()}, stats


def corrected_weight(qw: QuantizedWeight, correction: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """A layer's dequantized weight plus its stored low-rank correction (float16 factors)."""
    weight = qw.dequantize()
    if correction is None:
        return weight
    lowrank_a, lowrank_b = correction
    return weight + lowrank_a.float() @ lowrank_b.float()
