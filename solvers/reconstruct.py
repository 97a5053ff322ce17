"""Quantize one decoder block in true-sequential order: each group of linear layers is quantized
with Hessians collected from inputs that already went through the quantized earlier groups."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layerquant.specs import QuantSpec
from layerquant.solvers.gptq import hessian_weighted_error, quantize_weight
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


def collect_hessians(block: nn.Module, forward: BlockForward, inputs: torch.Tensor, layer_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Input Hessians of the named linear layers over all `inputs`, one block forward in all.

    Layers reading the same tensor (q/k/v, gate/up) are hooked once per group by the caller
    passing only the group's first layer name.
    """
    state: dict[str, tuple[torch.Tensor | None, int]] = {name: (None, 0) for name in layer_names}

    def make_hook(name: str):
        def hook(_module, args):
            hessian, seen = state[name]
            state[name] = accumulate_hessian(hessian, seen, args[0].detach())

        return hook

    handles = [block.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in layer_names]
    try:
        forward(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    # accumulated in float64 for accuracy, handed on in float32: GPTQ factors in float32 and
    # a float64 copy alive next to the factorization doubled a block's peak memory
    return {name: hessian.to(torch.float32) for name, (hessian, _) in state.items()}


def apply_quantization_sequential(
    block: nn.Module,
    forward: BlockForward,
    inputs: torch.Tensor,
    groups: Sequence[Sequence[str]],
    specs: dict[str, QuantSpec],
    damp_percent: float = 0.01,
    layer_prefix: str = "",
    on_layer: Callable[[LayerOutcome], None] | None = None,
) -> list[LayerOutcome]:
    """Quantize `block`'s linear layers in place; returns what happened to each layer.

    Layers without a spec stay float. Each group's Hessian comes from running the partially
    quantized block, so later groups compensate earlier groups' error (true-sequential). In
    place, because a second copy of a block is the largest avoidable allocation of a run.
    """
    outcomes: list[LayerOutcome] = []
    for group in groups:
        todo = [name for name in group if name in specs]
        if not todo:
            continue
        hessian = collect_hessians(block, forward, inputs, [todo[0]])[todo[0]]
        for name in todo:
            start = time.perf_counter()
            linear = block.get_submodule(name)
            weight = linear.weight.detach().float()
            tensors, weight_hat, damp_used = quantize_layer(weight, hessian, specs[name], damp_percent, layer_prefix + name)
            error = hessian_weighted_error(weight, weight_hat, hessian) / max(
                hessian_weighted_error(weight, torch.zeros_like(weight), hessian), 1e-30
            )
            with torch.no_grad():
                linear.weight.copy_(weight_hat.to(linear.weight.dtype))
            outcome = LayerOutcome(name, specs[name], tensors, tuple(weight.shape), error, damp_used, time.perf_counter() - start)
            del weight, weight_hat
            outcomes.append(outcome)
            if on_layer is not None:
                on_layer(outcome)
        del hessian
    return outcomes


def relative_output_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference||^2 / ||reference||^2 over a block's outputs."""
    ref = reference.double()
    return float(((approx.double() - ref) ** 2).sum() / (ref**2).sum().clamp(min=1e-30))


@dataclass
class BlockReconstruction:
    outcomes: list[LayerOutcome]
    outputs: torch.Tensor  # quantized block's outputs: the next block's inputs
    output_error: float  # relative error of the quantized block vs the float block, same inputs
    seconds: float


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
) -> BlockReconstruction:
    """Quantize decoder block `index` (float `weights`, block-relative names) on `inputs` [N, L, H]."""
    from layerquant.solvers.architectures import BlockContext, build_block, run_block

    start = time.perf_counter()
    context = BlockContext(arch, config, seq_len=inputs.shape[1])
    block = build_block(arch, config, index, weights)

    def forward(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_block(module, context, index, hidden, batch_size)

    float_outputs = forward(block, inputs)
    outcomes = apply_quantization_sequential(block, forward, inputs, arch.linear_groups, specs, damp_percent, layer_prefix=layer_prefix)
    outputs = forward(block, inputs)
    return BlockReconstruction(outcomes, outputs, relative_output_error(float_outputs, outputs), time.perf_counter() - start)


def stored_weight(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """The dequantized float32 weight of one layer from its stored tensors."""
    if spec.method == "pbllm":
        from layerquant.solvers.pbllm import PBLLMResult

        return PBLLMResult.from_tensors(tensors, spec).dequantize()
    from layerquant.solvers.grid import dequantize_grouped

    return dequantize_grouped(tensors["codes"], tensors["scales"], tensors["zeros"], spec.group_size)


def apply_block_artifact(
    float_weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], layers: list[dict]
) -> dict[str, torch.Tensor]:
    """Block weights as the quantized model uses them: each quantized layer's weight replaced by
    its dequantized value, and any stored full-tensor override (e.g. tweaked norms) applied.

    `tensors` holds "{layer}.{part}" for quantized layers and "override.{param}" for overrides;
    `layers` is the block artifact's layer list ({"name", "spec"}).
    """
    weights = dict(float_weights)
    for layer in layers:
        name = layer["name"]
        prefix = name + "."
        parts = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        weights[f"{name}.weight"] = stored_weight(parts, QuantSpec.from_dict(layer["spec"]))
    for key, value in tensors.items():
        if key.startswith("override."):
            weights[key[len("override.") :]] = value.float()
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

    hessians = collect_hessians(block, forward, inputs, [group[0] for group in arch.linear_groups])
    return forward(block, inputs), hessians
