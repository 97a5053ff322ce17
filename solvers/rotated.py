"""QuaRot's rotations folded into a model's weights, so the rotated float model computes the same
logits while its activations lose their outlier channels (arXiv 2404.00456).

For the Llama-like families (llama, mistral, qwen2, qwen3):
- Norm fold: an RMSNorm's scale (offset + w) moves into the linears that read it (q/k/v after
  input_layernorm, gate/up after post_attention_layernorm, the LM head after the final norm) and
  the norm keeps scale 1. Required first: a rotation commutes with a plain RMSNorm
  (||x Q|| = ||x||) but not with a per-channel scale.
- R1 (hidden x hidden, randomized Hadamard) on the residual stream: every linear reading it gets
  W Q, every linear writing it (o_proj, down_proj) Q^T W, the embeddings E Q, the LM head W Q.
  Tied embeddings (stories260K) cannot take both E Q (input side) and diag(g) E Q
  (output side) in one tensor; rather than untie (a second vocab x hidden matrix: 32k weights,
  12% of stories260K; 168M, 62% of Gemma 3 270M), R1 is applied online at the two ends: after the
  embedding lookup (x Q) and before the final norm (h Q^T), one hidden x hidden product per token
  each, and the final norm keeps its weight. The LM head is not quantized, so its input needs no
  rotation.
- R2 (head_dim x head_dim) per head between v_proj and o_proj: v_proj's rows of each kv head get
  R2^T, o_proj's columns of each head R2. Exact with grouped-query attention: attention mixes
  tokens, never channels, so a per-head rotation of the values passes through.
- R4 (intermediate x intermediate) at down_proj's input: W_down R4 folded, x R4 online (the
  SiLU-gated product cannot carry a rotation from gate/up), applied by `BlockRuntime.online`.
- R3 (head_dim x head_dim) on queries and keys after RoPE: online, and only where it matters,
  in the quantized KV cache: keys are quantized as k R3 and handed back as Q(k R3) R3^T, which
  gives attention exactly what rotating both q and k would (solvers/activations.py).

Gemma 3 (the family table's `output_norms` says where it differs): its post_attention and
post_feedforward norms normalize o_proj's and down_proj's outputs before the residual add, so R1
cannot be folded through them, and its residual stream carries a massive channel (53-96% of the
energy) that the (1 + w) input norms scale 10-50x down. Folding those norm scales into the linears
(as above) hands the activation quantizer the unscaled normalized residual, dominated by that
channel: measured on Gemma 3 270M with float weights (2 x 512 tokens), A4 went from 7085 unrotated
to 6.2e7 with a folded R1. So the residual stays unrotated and R1 is applied online at the inputs of
q/k/v and gate/up, after their norms with their scales (W R1 folded into those linears; one
hidden x hidden product per group input and token, 640 = 20 x 32 is H20 (x) H32 for a fast
transform): A4 31.1, A8 20.21 against 21.09 unrotated, float unchanged (20.132). R2, R3 and R4 as
above. q_norm / k_norm act per head after q_proj / k_proj: untouched (R1 is on the input side only).
head_dim 256 (not hidden/heads = 640/4 = 160): R2 is 256-wide, read from config.head_dim. The tied,
sqrt(hidden)-scaled embeddings and the LM head are untouched (no untying).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from layerquant.errors import InvalidSpec
from layerquant.runtime_quant import RuntimeQuant
from layerquant.solvers.activations import BlockRuntime
from layerquant.solvers.rotation import hadamard, random_hadamard

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass(frozen=True)
class Rotation:
    residual: torch.Tensor  # R1 [hidden, hidden], float64
    head: torch.Tensor  # R2 [head_dim, head_dim]
    down: torch.Tensor  # R4 [intermediate, intermediate]
    online_ends: bool  # tied embeddings: R1 applied online after the embedding and before the final norm
    # False (Gemma 3): the residual stream stays unrotated and R1 is applied online at the inputs
    # of q/k/v and gate/up, after their norms (see the module docstring)
    residual_rotated: bool = True


def ensure_rotatable(arch) -> None:
    if arch.model_type not in ROTATABLE:
        raise InvalidSpec(f"rotation is not built for {arch.model_type} yet (its norms and linears must be mapped: see solvers/rotated.py)",
                          f"leave rotate off for this model; it is built for {', '.join(ROTATABLE)}")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def plan_rotation(arch, config, tied_embeddings: bool, seed: int = 0) -> Rotation:
    ensure_rotatable(arch)
    residual_rotated = not arch.output_norms
    return Rotation(
        residual=random_hadamard(config.hidden_size, seed),
        head=hadamard(head_dim(config)),
        down=hadamard(config.intermediate_size),
        online_ends=tied_embeddings and residual_rotated,
        residual_rotated=residual_rotated,
    )


# the linears that read the residual stream through a norm, with that norm
def _residual_readers(arch) -> dict[str, tuple[str, ...]]:
    return {arch.input_norm: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), arch.mlp_norm: ("mlp.gate_proj", "mlp.up_proj")}


def _scale(arch, weights: dict[str, torch.Tensor], norm: str) -> torch.Tensor:
    return arch.norm_offset + weights[f"{norm}.weight"].double()


def rotate_block_weights(arch, config, weights: dict[str, torch.Tensor], rotation: Rotation) -> dict[str, torch.Tensor]:
    """Block-relative `weights` with the norms folded and R1, R2, R4 applied (each tensor keeps
    its dtype; the arithmetic is float64). The block computes the same function on the rotated
    residual stream, given R4 online at down_proj's input."""
    ensure_rotatable(arch)
    out = dict(weights)
    q = rotation.residual
    d = head_dim(config)

    for norm, names in _residual_readers(arch).items():
        # folded: the norm's scale moves into its readers; online (Gemma 3): the norm keeps it
        scale = _scale(arch, weights, norm) if rotation.residual_rotated else 1.0
        for name in names:
            w = weights[f"{name}.weight"]
            out[f"{name}.weight"] = ((w.double() * scale) @ q).to(w.dtype)
        if rotation.residual_rotated:
            out[f"{norm}.weight"] = torch.full_like(weights[f"{norm}.weight"], 1.0 - arch.norm_offset)
    # writers into the residual stream take Q^T on their output side where it is rotated
    # (Gemma 3's stays unrotated: its post-norms sit between the writers and the residual add)
    write_rotation = q.T if rotation.residual_rotated else torch.eye(q.shape[0], dtype=q.dtype)
    # R2: each kv head's value rows v_h -> v_h R2 (rows of W_v: R2^T W_h), and o_proj's columns
    # of each attention head read them back (W_o[:, h] R2)
    v = out["self_attn.v_proj.weight"]
    heads = v.shape[0] // d
    out["self_attn.v_proj.weight"] = (rotation.head.T @ v.double().reshape(heads, d, -1)).reshape(v.shape).to(v.dtype)
    if "self_attn.v_proj.bias" in weights:
        b = weights["self_attn.v_proj.bias"]
        out["self_attn.v_proj.bias"] = (b.double().reshape(heads, d) @ rotation.head).reshape(b.shape).to(b.dtype)
    o = weights["self_attn.o_proj.weight"]
    o_heads = o.double().reshape(o.shape[0], -1, d) @ rotation.head
    out["self_attn.o_proj.weight"] = (write_rotation @ o_heads.reshape(o.shape)).to(o.dtype)
    if "self_attn.o_proj.bias" in weights:
        b = weights["self_attn.o_proj.bias"]
        out["self_attn.o_proj.bias"] = (b.double() @ write_rotation.T).to(b.dtype)
    down = weights["mlp.down_proj.weight"]
    out["mlp.down_proj.weight"] = (write_rotation @ down.double() @ rotation.down).to(down.dtype)
    return out


def unrotate_block_weights(arch, config, weights: dict[str, torch.Tensor], rotation: Rotation) -> dict[str, torch.Tensor]:
    """Rotated (and possibly quantized) block weights expressed back in the original basis:
    R1, R2 and R4 undone, the norm scales left folded into the linears (norms at scale 1, so no
    division by a norm weight). With the original embeddings, final norm and LM head this is a
    plain model computing exactly what the rotated one computes: how a rotated run's weights are
    written out as a folder any transformers loads (activation quantization is not in it)."""
    ensure_rotatable(arch)
    out = dict(weights)
    q = rotation.residual
    d = head_dim(config)
    write_rotation = q if rotation.residual_rotated else torch.eye(q.shape[0], dtype=q.dtype)
    for norm, names in _residual_readers(arch).items():
        if not rotation.residual_rotated:  # R1 online at the readers' inputs: only their weights carry it
            for name in names:
                w = weights[f"{name}.weight"]
                out[f"{name}.weight"] = (w.double() @ q.T).to(w.dtype)
            continue
        # norm scales that tuning moved away from 1 act in the rotated basis: folded into the
        # linears before those are rotated back (a no-op for the untuned unit norms)
        scale = _scale(arch, weights, norm)
        for name in names:
            w = weights[f"{name}.weight"]
            out[f"{name}.weight"] = ((w.double() * scale[None, :]) @ q.T).to(w.dtype)
        out[f"{norm}.weight"] = torch.full_like(weights[f"{norm}.weight"], 1.0 - arch.norm_offset)
    v = out["self_attn.v_proj.weight"]
    heads = v.shape[0] // d
    out["self_attn.v_proj.weight"] = (rotation.head @ v.double().reshape(heads, d, -1)).reshape(v.shape).to(v.dtype)
    if "self_attn.v_proj.bias" in weights:
        b = weights["self_attn.v_proj.bias"]
        out["self_attn.v_proj.bias"] = (b.double().reshape(heads, d) @ rotation.head.T).reshape(b.shape).to(b.dtype)
    o = weights["self_attn.o_proj.weight"]
    o_plain = (write_rotation @ o.double()).reshape(o.shape[0], -1, d) @ rotation.head.T
    out["self_attn.o_proj.weight"] = o_plain.reshape(o.shape).to(o.dtype)
    if "self_attn.o_proj.bias" in weights:
        b = weights["self_attn.o_proj.bias"]
        out["self_attn.o_proj.bias"] = (b.double() @ write_rotation.T).to(b.dtype)
    down = weights["mlp.down_proj.weight"]
    out["mlp.down_proj.weight"] = (write_rotation @ down.double() @ rotation.down.T).to(down.dtype)
    return out


def rotate_embedding(embed_weight: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """The input embeddings as the rotated model reads them (unchanged when R1 is online there)."""
    if rotation.online_ends or not rotation.residual_rotated:
        return embed_weight
    return (embed_weight.double() @ rotation.residual).to(embed_weight.dtype)


def rotate_head(arch, final_norm_weight: torch.Tensor, lm_head_weight: torch.Tensor, rotation: Rotation) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm weight, LM head weight) of the rotated model: the norm folded into the head and
    R1 applied to the head's input, or both unchanged when R1 is undone online before the norm."""
    if rotation.online_ends or not rotation.residual_rotated:
        return final_norm_weight, lm_head_weight
    scale = arch.norm_offset + final_norm_weight.double()
    head = ((lm_head_weight.double() * scale[None, :]) @ rotation.residual).to(lm_head_weight.dtype)
    return torch.full_like(final_norm_weight, 1.0 - arch.norm_offset), head


def embedding_output_transform(rotation: Rotation | None) -> torch.Tensor | None:
    """What the embedding lookup's output is multiplied by online (None: nothing)."""
    return rotation.residual if rotation is not None and rotation.online_ends else None


def final_norm_input_transform(rotation: Rotation | None) -> torch.Tensor | None:
    """What the last block's output is multiplied by online before the final norm (None: nothing)."""
    return rotation.residual.T if rotation is not None and rotation.online_ends else None


def block_runtime(arch, settings: RuntimeQuant, rotation: Rotation | None, quantized: tuple[str, ...] | None = None) -> BlockRuntime:
    """The run-time transforms of one block: activation fake-quant at the inputs of `quantized`
    (default: every decoder linear), R4 online at down_proj, R3 on cached keys and R1 at the
    inputs of the residual stream's readers (Gemma 3) when rotated."""
    online = {"mlp.down_proj": rotation.down} if rotation is not None else {}
    if rotation is not None and not rotation.residual_rotated:  # Gemma 3: R1 at the residual readers' inputs
        online.update({name: rotation.residual for names in _residual_readers(arch).values() for name in names})
    key_rotation = rotation.head if rotation is not None else None
    return BlockRuntime(settings, tuple(arch.linear_names if quantized is None else quantized), online, key_rotation)
