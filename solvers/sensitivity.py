"""Sensitivity of each layer to each candidate spec: the error that candidate would actually
leave (after GPTQ's error feedback, not just rounding), measured in the block's output. Summed
over layers it approximates the loss increase (HAWQ-V3; HIGGS's linearity theorem)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from layerquant.specs import QuantSpec


def score_block_sensitivity(
    arch, config, index: int, weights: dict[str, torch.Tensor], inputs: torch.Tensor, hessians: dict[str, torch.Tensor],
    candidates: Sequence[QuantSpec], damp_percent: float = 0.01, layer_prefix: str = "", max_samples: int = 16,
) -> dict[str, list[float]]:
    """Per layer and candidate: the relative error ||B_q(x) - B(x)||^2 / ||B(x)||^2 of the block's
    output (the residual stream) when only that layer is quantized.

    Measured in the residual stream and relative to its norm, scores of layers in different
    blocks and of different kinds are on one scale, which a layer's own Hessian-weighted error
    is not (a v_proj error and a down_proj error reach the loss very differently).
    """
    from layerquant.solvers.architectures import BlockContext, build_block, run_block
    from layerquant.solvers.reconstruct import quantize_layer, relative_output_error

    sample = inputs[:max_samples]
    context = BlockContext(arch, config, seq_len=sample.shape[1])
    block = build_block(arch, config, index, dict(weights))
    reference = run_block(block, context, index, sample)
    scores: dict[str, list[float]] = {}
    for group in arch.linear_groups:
        for name in group:
            linear = block.get_submodule(name)
            original = linear.weight.detach().clone()
            row = []
            for spec in candidates:
                _, weight_hat, _ = quantize_layer(original, hessians[group[0]], spec, damp_percent, layer_prefix + name)
                with torch.no_grad():
                    linear.weight.copy_(weight_hat)
                row.append(relative_output_error(reference, run_block(block, context, index, sample)))
            with torch.no_grad():
                linear.weight.copy_(original)
            scores[name] = row
    return scores
