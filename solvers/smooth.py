"""SmoothQuant-style scale migration (arXiv 2211.10438): the alternative to rotation for making
activations quantizable. Per input channel j of a linear group, s_j = max|X_j|^alpha /
max|W_j|^(1 - alpha) divides the activations and multiplies the weights' columns, folded where
the activation is produced, so the float block computes the same function:
- q/k/v: the scale folds into the input norm's (offset + w), family-aware, so Gemma 3's (1 + w)
  norms fold too (and the next norm is read from the family table: pre_feedforward_layernorm
  on Gemma 3, not post_attention_layernorm, the mistake the issue reports in llm-compressor's
  Gemma 3 mapping);
- gate/up: into the norm that feeds the MLP (`Architecture.mlp_norm`);
- down_proj: into up_proj's rows (act(gate) * up is linear in up).
o_proj is left alone: its input is attention's mix of v, foldable into v_proj only with one
scale per kv-head channel shared by the heads of a group (not built).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from layerquant.runtime_quant import SMOOTH_ALPHA as ALPHA


def migration_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = ALPHA) -> torch.Tensor:
    """s [in_features]: activations are divided by s, the weights' columns multiplied by it."""
    weight_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).double()
    scales = act_absmax.double().clamp(min=1e-5) ** alpha / weight_absmax.clamp(min=1e-5) ** (1 - alpha)
    return scales.clamp(min=1e-5)


def smooth_block_weights(arch, weights: dict[str, torch.Tensor], act_absmax: Mapping[str, torch.Tensor],
                         alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """Block-relative `weights` with scales migrated; `act_absmax` maps "self_attn.q_proj",
    "mlp.gate_proj" and "mlp.down_proj" to the per-channel max |input| of the float block."""
    out = dict(weights)

    def through_norm(names, norm):
        scales = migration_scales(act_absmax[names[0]], [weights[f"{n}.weight"] for n in names], alpha)
        norm_w = weights[f"{norm}.weight"]
        out[f"{norm}.weight"] = ((arch.norm_offset + norm_w.double()) / scales - arch.norm_offset).to(norm_w.dtype)
        for name in names:
            w = weights[f"{name}.weight"]
            out[f"{name}.weight"] = (w.double() * scales[None, :]).to(w.dtype)

    through_norm(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), arch.input_norm)
    through_norm(("mlp.gate_proj", "mlp.up_proj"), arch.mlp_norm)
    scales = migration_scales(act_absmax["mlp.down_proj"], [weights["mlp.down_proj.weight"]], alpha)
    up, down = out["mlp.up_proj.weight"], weights["mlp.down_proj.weight"]
    out["mlp.up_proj.weight"] = (up.double() / scales[:, None]).to(up.dtype)
    out["mlp.down_proj.weight"] = (down.double() * scales[None, :]).to(down.dtype)
    return out


SMOOTHED_INPUTS = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


@torch.no_grad()
def input_absmax(block: torch.nn.Module, forward, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of the linears SmoothQuant folds for, over all `inputs`."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            peak = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            seen[name] = peak if name not in seen else torch.maximum(seen[name], peak)
        return record

    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in SMOOTHED_INPUTS]
    try:
        forward(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen
