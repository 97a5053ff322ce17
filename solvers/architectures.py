"""The pure-torch pieces that run a model one block at a time: embeddings, rotary tables,
attention masks, a decoder block, the final norm + LM head. The table of supported families
itself is `layerquant.architectures`.

Blocks are the families' own transformers modules, so a streamed block computes exactly what the
transformers model computes; only the wiring between blocks lives here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerquant.cancellation import raise_if_cancelled
# the family table is core data (the checkpoint reader needs it too); re-exported so solvers and
# tasks keep reading everything about a family from this module
from layerquant.architectures import (  # noqa: F401
    ARCHITECTURES,
    ATTN_OUT,
    ATTN_QKV,
    LLAMA_GROUPS,
    MLP_IN,
    MLP_OUT,
    Architecture,
    architecture_for,
    load_config,
)


def layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) and config.model_type == "mistral" else "full_attention"
    return [kind] * config.num_hidden_layers


class BlockContext:
    """Per-sequence-length tables shared by every block: rotary cos/sin and attention masks."""

    def __init__(self, arch: Architecture, config, seq_len: int, dtype: torch.dtype = torch.float32, kv_cache: Any = None):
        self.arch = arch
        # handed to every block as `past_key_values`: a fake-quantized cache (solvers/activations.py)
        # sees keys and values as they would enter a real cache; None runs attention on them as computed
        self.kv_cache = kv_cache
        self.config = config
        self.seq_len = seq_len
        self.layer_types = layer_types(config)
        rotary = getattr(arch.modeling(), f"{arch.class_prefix}RotaryEmbedding")(config)
        positions = torch.arange(seq_len).unsqueeze(0)
        probe = torch.zeros(1, seq_len, config.hidden_size, dtype=dtype)
        self.position_ids = positions
        self.position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for kind in set(self.layer_types):
            if arch.rotary_per_layer_type:
                self.position_embeddings[kind] = rotary(probe, positions, kind)
            else:
                self.position_embeddings[kind] = rotary(probe, positions)
        self.masks = {kind: self._mask(kind) for kind in set(self.layer_types)}

    def _mask(self, kind: str) -> torch.Tensor | None:
        window = getattr(self.config, "sliding_window", None)
        if kind != "sliding_attention" or not window or self.seq_len <= window:
            return None  # sdpa's own causal path, as transformers does for a plain causal mask
        i = torch.arange(self.seq_len)[:, None]
        j = torch.arange(self.seq_len)[None, :]
        return ((j <= i) & (i - j < window))[None, None]

    def block_kwargs(self, index: int, rows: slice | None = None) -> dict[str, Any]:
        """The keyword arguments of block `index`'s forward; `rows`: which of the call's sequences
        the batch holds (a cache with one prompt per sequence hands each batch its own rows)."""
        kind = self.layer_types[index]
        kwargs = {
            "attention_mask": self.masks[kind],
            "position_embeddings": self.position_embeddings[kind],
            "position_ids": self.position_ids,
        }
        if self.kv_cache is not None:
            kwargs["past_key_values"] = self.kv_cache if rows is None else self.kv_cache.for_rows(rows)
        return kwargs


def build_block(arch: Architecture, config, index: int, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The family's decoder layer for block `index`, holding `weights` (block-relative names)."""
    layer_cls = getattr(arch.modeling(), f"{arch.class_prefix}DecoderLayer")
    with torch.device("meta"):
        block = layer_cls(config, index)
    missing = set(block.state_dict()) - set(weights)
    if missing:
        raise KeyError(f"block {index} is missing weights: {sorted(missing)}")
    block.load_state_dict(weights, strict=True, assign=True)
    # buffers that are not in the checkpoint (none today) would stay on meta: fail loudly
    for name, buffer in block.named_buffers():
        if buffer.is_meta:
            raise RuntimeError(f"block {index} buffer {name} has no value")
    return block.eval()


@torch.no_grad()
def run_block(block: nn.Module, context: BlockContext, index: int, hidden: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Block outputs for hidden states [N, L, H], computed in batches of samples."""
    outputs = []
    for start in range(0, hidden.shape[0], batch_size):
        raise_if_cancelled()  # Ctrl-C of a CLI run: stop between batches
        rows = slice(start, start + batch_size)
        out = block(hidden[rows], **context.block_kwargs(index, rows))
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outputs)


def embed_tokens(arch: Architecture, config, embed_weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    hidden = nn.functional.embedding(tokens, embed_weight)
    if arch.embed_scaled:
        hidden = hidden * torch.tensor(config.hidden_size**0.5, dtype=hidden.dtype)
    return hidden


def family_norm(arch: Architecture, config, norm_weight: torch.Tensor) -> nn.Module:
    """The family's own RMSNorm with `norm_weight` (the final norm, or a block's input norm)."""
    norm = getattr(arch.modeling(), f"{arch.class_prefix}RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    norm.load_state_dict({"weight": norm_weight})
    return norm.eval()


@torch.no_grad()
def head_logits(hidden: torch.Tensor, norm: nn.Module, lm_head_weight: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Logits [T, V] of last hidden states [T, H]: final norm, LM head (float32), the family's softcap."""
    logits = norm(hidden).float() @ lm_head_weight.float().T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@torch.no_grad()
def token_nll(
    hidden: torch.Tensor,
    norm: nn.Module,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    vocab_chunk: int = 32768,
) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods for one sequence, never holding full logits.

    hidden [L, H] are last-block outputs, targets [L] the next tokens (-100 = ignore). The LM head
    runs in vocabulary chunks with a streaming log-sum-exp, so a 262k vocabulary costs
    L x vocab_chunk floats, not L x 262k.
    """
    h = norm(hidden).float()
    weight = lm_head_weight
    running_max = torch.full((h.shape[0],), -float("inf"))
    running_sum = torch.zeros(h.shape[0])
    target_logit = torch.zeros(h.shape[0])
    valid = targets >= 0
    for start in range(0, weight.shape[0], vocab_chunk):
        logits = h @ weight[start : start + vocab_chunk].float().T
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        chunk_max = logits.amax(dim=1)
        new_max = torch.maximum(running_max, chunk_max)
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
        running_max = new_max
        in_chunk = valid & (targets >= start) & (targets < start + logits.shape[1])
        rows = in_chunk.nonzero(as_tuple=True)[0]
        target_logit[rows] = logits[rows, targets[rows] - start]
    nll = running_max + torch.log(running_sum) - target_logit
    return nll[valid].double().sum()
