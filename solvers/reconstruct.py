"""Quantize one decoder block in true-sequential order: each group of linear layers is quantized
with Hessians collected from inputs that already went through the quantized earlier groups."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from layerquant.block_artifact import BlockArtifact
from layerquant.errors import InvalidSpec
from layerquant.specs import QuantSpec
from layerquant.solvers.gptq import quantize_weight, relative_weighted_error
from layerquant.solvers.hessian import accumulate_hessian

BlockForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class LayerOutcome:
    name: str  # block-relative, e.g. "self_attn.q_proj"
    spec: QuantSpec
    tensors: dict[str, torch.Tensor]  # what is stored: codes/scales/zeros, or PB-LLM's parts
    shape: tuple[int, int]  # [out_features, in_features]
    error: float  # relative Hessian-weighted error tr(E H E^T) / tr(W H W^T)
    damp_used: float
    seconds: float


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp_percent: float, layer: str):
    """(stored tensors, dequantized weight, damp used) for one matrix under one spec."""
    if spec.method == "pbllm":
        from layerquant.solvers.pbllm import binarize_partial

        result = binarize_partial(weight, hessian, spec, damp_percent=damp_percent, layer=layer)
        return result.to_tensors(), result.dequantize(), getattr(result, "damp_used", damp_percent)
    result = quantize_weight(weight, hessian, spec, damp_percent=damp_percent, layer=layer)
    return result.quantized.to_tensors(), result.quantized.dequantize(), result.damp_used


class _InputsSeen(Exception):
    """Raised by a Hessian hook once every hooked layer has seen the batch: the rest of the
    block's forward would be thrown away."""


def collect_hessians(
    block: nn.Module, forward: BlockForward, inputs: torch.Tensor, layer_names: Sequence[str], batch_size: int = 8,
    keep_outputs: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Input Hessians of the named linear layers over all `inputs`, and the block's outputs
    when `keep_outputs` (else None).

    `forward` is called on `batch_size` samples at a time and must run them as one batch.
    Without `keep_outputs` each batch stops at the last hooked layer, so the Hessian of an
    attention projection does not pay for the MLP behind it. Layers reading the same tensor
    (q/k/v, gate/up) are hooked once per group by the caller passing only the group's first
    layer name.
    """
    state: dict[str, tuple[torch.Tensor | None, int]] = {name: (None, 0) for name in layer_names}
    waiting: set[str] = set()

    def make_hook(name: str):
        def hook(_module, args):
            hessian, seen = state[name]
            state[name] = accumulate_hessian(hessian, seen, args[0].detach())
            waiting.discard(name)
            if not waiting and not keep_outputs:
                raise _InputsSeen

        return hook

    handles = [block.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in layer_names]
    outputs = []
    try:
        for start in range(0, inputs.shape[0], batch_size):
            waiting.update(layer_names)
            try:
                outputs.append(forward(block, inputs[start : start + batch_size]))
            except _InputsSeen:
                pass
    finally:
        for handle in handles:
            handle.remove()
    # accumulated in float64 for accuracy, handed on in float32: GPTQ factors in float32 and
    # a float64 copy alive next to the factorization doubled a block's peak memory
    hessians = {name: hessian.to(torch.float32) for name, (hessian, _) in state.items()}
    return hessians, torch.cat(outputs) if keep_outputs else None


def apply_quantization_sequential(
    block: nn.Module,
    forward: BlockForward,
    inputs: torch.Tensor,
    groups: Sequence[Sequence[str]],
    specs: dict[str, QuantSpec],
    damp_percent: float = 0.01,
    layer_prefix: str = "",
    batch_size: int = 8,
    float_hessians: dict[str, torch.Tensor] | None = None,
) -> list[LayerOutcome]:
    """Quantize `block`'s linear layers in place; returns what happened to each layer.

    Layers without a spec stay float. Each group's Hessian comes from running the partially
    quantized block, so later groups compensate earlier groups' error (true-sequential). In
    place, because a second copy of a block is the largest avoidable allocation of a run.
    `float_hessians` (layer -> Hessian, collected on the unquantized block) are used while no
    layer has been quantized yet, when they are the same thing.
    """
    outcomes: list[LayerOutcome] = []
    for group in groups:
        todo = [name for name in group if name in specs]
        if not todo:
            continue
        if not outcomes and float_hessians and todo[0] in float_hessians:
            hessian = float_hessians[todo[0]]
        else:
            hessian = collect_hessians(block, forward, inputs, [todo[0]], batch_size)[0][todo[0]]
        for name in todo:
            start = time.perf_counter()
            linear = block.get_submodule(name)
            weight = linear.weight.detach().float()
            tensors, weight_hat, damp_used = quantize_layer(weight, hessian, specs[name], damp_percent, layer_prefix + name)
            error = relative_weighted_error(weight, weight_hat, hessian)
            with torch.no_grad():
                linear.weight.copy_(weight_hat.to(linear.weight.dtype))
            outcome = LayerOutcome(name, specs[name], tensors, tuple(weight.shape), error, damp_used, time.perf_counter() - start)
            del weight, weight_hat
            outcomes.append(outcome)
        del hessian
    return outcomes


def relative_output_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference||^2 / ||reference||^2 over a block's outputs."""
    ref = reference.double()
    return float(((approx.double() - ref) ** 2).sum() / (ref**2).sum().clamp(min=1e-30))


@dataclass(frozen=True)
class BlockTuning:
    """What runs after a block's layers are quantized, each step fitted to the float block's
    outputs on the same inputs: AdaQuant-style scale refinement (codes stay on their grid),
    then norm tweaking. Zero steps switch a step off."""

    refine_steps: int = 0
    refine_lr: float = 3e-3
    norm_tweak_steps: int = 0
    norm_tweak_lr: float = 3e-3
    # "mse" (relative output MSE) rather than the paper's channel statistics: after GPTQ on
    # stories260K, L_dist made 2-bit perplexity worse (30.3 -> 31.9) while MSE lowered it (23.2)
    norm_tweak_loss: str = "mse"
    batch_size: int = 4
    seed: int = 0
    # share of the calibration samples held out to choose each step's best iterate (0 = the
    # training samples choose, which lets a step keep changes that only fit them)
    holdout: float = 0.0
    # "residual": the loss compares block outputs; "next_norm": it compares them after the
    # next block's input norm (the caller passes that norm to `reconstruct_block`)
    space: str = "residual"

    @property
    def enabled(self) -> bool:
        return self.refine_steps > 0 or self.norm_tweak_steps > 0

    def identity(self) -> dict:
        """The settings that change the result (empty when nothing runs, so plain runs keep their keys)."""
        out: dict = {}
        if self.refine_steps:
            out["refine"] = {"steps": self.refine_steps, "lr": self.refine_lr}
        if self.norm_tweak_steps:
            out["norm_tweak"] = {"steps": self.norm_tweak_steps, "lr": self.norm_tweak_lr, "loss": self.norm_tweak_loss}
        if out:
            out |= {"batch_size": self.batch_size, "seed": self.seed, "holdout": self.holdout}
            if self.space != "residual":  # absent by default: earlier tuned runs keep their keys
                out["space"] = self.space
        return out


@dataclass
class BlockReconstruction:
    outcomes: list[LayerOutcome]
    outputs: torch.Tensor  # quantized block's outputs: the next block's inputs
    output_error: float  # relative error of the quantized block vs the float block, same inputs
    seconds: float
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # block parameter -> tuned value (norms)
    tuning: dict = field(default_factory=dict)  # what refinement / norm tweaking achieved


def reconstruct_block(
    arch,
    config,
    index: int,
    weights: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    specs: dict[str, QuantSpec],
    damp_percent: float = 0.01,
    batch_size: int = 8,
    layer_prefix: str = "",
    tuning: BlockTuning | None = None,
    tuning_targets: torch.Tensor | None = None,
    next_norm: nn.Module | None = None,
) -> BlockReconstruction:
    """Quantize decoder block `index` (float `weights`, block-relative names) on `inputs` [N, L, H],
    then apply `tuning` (refinement, norm tweaking) if given, fitted to `tuning_targets`: by
    default the float block's outputs on `inputs`; the float model's hidden states after this
    block let tuning also make up for the error earlier blocks left. With `tuning.space`
    "next_norm", `next_norm` (the next block's input norm, or the final norm after the last
    block) is applied to outputs and targets before they are compared."""
    from layerquant.solvers.architectures import BlockContext, build_block, run_block

    start = time.perf_counter()
    context = BlockContext(arch, config, seq_len=inputs.shape[1])
    block = build_block(arch, config, index, weights)

    def forward(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_block(module, context, index, hidden, batch_size)

    # the float pass also yields the first group's Hessian: nothing before it is quantized yet
    first = next((name for group in arch.linear_groups for name in group if name in specs), None)
    float_hessians, float_outputs = collect_hessians(block, forward, inputs, [first] if first else [], batch_size, keep_outputs=True)
    outcomes = apply_quantization_sequential(block, forward, inputs, arch.linear_groups, specs, damp_percent, layer_prefix=layer_prefix,
                                             batch_size=batch_size, float_hessians=float_hessians)
    overrides: dict[str, torch.Tensor] = {}
    report: dict = {}
    if tuning is not None and tuning.enabled:
        targets = float_outputs if tuning_targets is None else tuning_targets
        if tuning.space == "next_norm" and next_norm is None:
            raise InvalidSpec("tuning in the next_norm space needs the next block's input norm",
                              "pass next_norm (the final norm for the last block), or use space 'residual'")
        project = next_norm if tuning.space == "next_norm" else None
        overrides, report = tune_block(block, context.block_kwargs(index), arch.norms, outcomes, inputs, targets, tuning, project)
    outputs = forward(block, inputs)
    return BlockReconstruction(outcomes, outputs, relative_output_error(float_outputs, outputs), time.perf_counter() - start,
                               overrides, report)


def tune_block(
    block: nn.Module,
    block_kwargs: dict,
    norm_names: Sequence[str],
    outcomes: list[LayerOutcome],
    inputs: torch.Tensor,
    float_outputs: torch.Tensor,
    tuning: BlockTuning,
    project: nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Refine the scales of `outcomes` (updated in place, with the block's weights) and tweak
    the block's norms; returns (tuned norm weights by parameter name, what each step achieved).
    `project` (a frozen module), when given, maps outputs and targets alike before every loss."""
    from layerquant.solvers.grid import QuantizedWeight
    from layerquant.solvers.norm_tweak import functional_block_forward, norm_weights_of, tweak_norms
    from layerquant.solvers.refine import refine_scales

    report: dict = {}
    overrides: dict[str, torch.Tensor] = {}
    common = {"batch_size": tuning.batch_size, "seed": tuning.seed}
    if project is not None:
        project = project.requires_grad_(False)
        with torch.no_grad():
            float_outputs = torch.cat([project(float_outputs[i : i + tuning.batch_size]) for i in range(0, len(float_outputs), tuning.batch_size)])
    held_out = int(round(tuning.holdout * inputs.shape[0]))
    if 0 < held_out < inputs.shape[0]:
        common["validation"] = (inputs[-held_out:], float_outputs[-held_out:])
        inputs, float_outputs = inputs[:-held_out], float_outputs[:-held_out]
    # PB-LLM layers have no integer grid whose scales could move
    refinable = {o.name: o for o in outcomes if o.spec.method != "pbllm"}
    if tuning.refine_steps and refinable:
        layers = {name: QuantizedWeight.from_tensors(o.tensors, o.spec) for name, o in refinable.items()}
        weight_forward = _projected(functional_block_forward(block, [f"{name}.weight" for name in layers], **block_kwargs), project)
        refined, stats = refine_scales(weight_forward, layers, inputs, float_outputs, steps=tuning.refine_steps, lr=tuning.refine_lr, **common)
        with torch.no_grad():
            for name, quantized in refined.items():
                refinable[name].tensors = quantized.to_tensors()
                linear = block.get_submodule(name)
                linear.weight.copy_(quantized.dequantize().to(linear.weight.dtype))
        report["refine"] = {"loss_before": stats.initial_loss, "loss_after": stats.best_loss, "best_step": stats.best_step,
                            "seconds": round(stats.seconds, 3)}
    if tuning.norm_tweak_steps:
        start = norm_weights_of(block, norm_names)
        norm_forward = _projected(functional_block_forward(block, norm_names, **block_kwargs), project)
        tweaked, stats = tweak_norms(norm_forward, start, inputs, float_outputs, steps=tuning.norm_tweak_steps,
                                     lr=tuning.norm_tweak_lr, loss=tuning.norm_tweak_loss, **common)
        params = dict(block.named_parameters())
        with torch.no_grad():
            for key, value in tweaked.items():
                params[key].copy_(value)
        overrides = {key: value.detach().clone() for key, value in tweaked.items() if stats.best_step > 0}
        report["norm_tweak"] = {"loss": tuning.norm_tweak_loss, "loss_before": stats.initial_loss, "loss_after": stats.best_loss,
                                "best_step": stats.best_step, "seconds": round(stats.seconds, 3)}
    return overrides, report


def _projected(forward, project: nn.Module | None):
    if project is None:
        return forward
    return lambda weights, hidden: project(forward(weights, hidden))


def stored_weight(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """The dequantized float32 weight of one layer from its stored tensors."""
    if spec.method == "pbllm":
        from layerquant.solvers.pbllm import PBLLMResult

        return PBLLMResult.from_tensors(tensors, spec).dequantize()
    from layerquant.solvers.grid import dequantize_grouped

    return dequantize_grouped(tensors["codes"], tensors["scales"], tensors["zeros"], spec.group_size)


def apply_block_artifact(float_weights: dict[str, torch.Tensor], artifact: BlockArtifact) -> dict[str, torch.Tensor]:
    """Block weights as the quantized model uses them: each quantized layer's weight replaced by
    its dequantized value, and any stored full-tensor override (e.g. tweaked norms) applied."""
    weights = dict(float_weights)
    for record in artifact.layers:
        weights[f"{record.name}.weight"] = stored_weight(artifact.layer_tensors(record.name), record.spec)
    for param, value in artifact.overrides.items():
        weights[param] = value.float()
    return weights


def float_block_hessians(
    arch, config, index: int, weights: dict[str, torch.Tensor], inputs: torch.Tensor, batch_size: int = 8
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The float block's outputs on `inputs` and the input Hessian of each linear group (keyed
    by the group's first layer), all from the unquantized block: what sensitivity scoring needs
    before any bit-width is chosen."""
    from layerquant.solvers.architectures import BlockContext, build_block, run_block

    context = BlockContext(arch, config, seq_len=inputs.shape[1])
    block = build_block(arch, config, index, weights)

    def forward(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_block(module, context, index, hidden, batch_size)

    hessians, outputs = collect_hessians(block, forward, inputs, [group[0] for group in arch.linear_groups], batch_size, keep_outputs=True)
    return outputs, hessians
