"""The table of supported decoder families: how each one names and lays out its weights.

Pure data (no torch), so that reading a checkpoint (infra) and running a block (solvers) share
one description of every family without either importing the other. The torch pieces that run
a block live in `layerquant.solvers.architectures`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from layerquant.errors import UnsupportedArchitecture

ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ATTN_OUT = ("self_attn.o_proj",)
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
MLP_OUT = ("mlp.down_proj",)
LLAMA_GROUPS = (ATTN_QKV, ATTN_OUT, MLP_IN, MLP_OUT)


@dataclass(frozen=True)
class Architecture:
    """How one family lays out a decoder: enough to stream it block by block."""

    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    class_prefix: str  # <Prefix>DecoderLayer, <Prefix>RotaryEmbedding, <Prefix>RMSNorm
    # linear layers of a block in true-sequential order; layers in one group share one input
    linear_groups: tuple[tuple[str, ...], ...] = LLAMA_GROUPS
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    input_norm: str = "input_layernorm"  # the norm a block applies to its input first
    mlp_norm: str = "post_attention_layernorm"  # the norm whose output gate/up read
    # norms applied to a sublayer's output before the residual add (Gemma 3's post-norms): a
    # residual-stream rotation cannot be folded through them (solvers/rotated.py)
    output_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w)
    embed_scaled: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    rotary_per_layer_type: bool = False  # Gemma 3 keeps local and global rope tables
    block_prefix: str = "model.layers.{index}."
    embed_name: str = "model.embed_tokens.weight"
    final_norm_name: str = "model.norm.weight"
    lm_head_name: str = "lm_head.weight"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def modeling(self):
        """The family's transformers modeling module, imported only when a block is built."""
        return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")

    def norm_reading_block_output(self, index: int, n_blocks: int) -> str:
        """The weight name of the norm that first reads block `index`'s output: the next
        block's input norm, or the final norm after the last block."""
        if index + 1 < n_blocks:
            return self.block_prefix.format(index=index + 1) + self.input_norm + ".weight"
        return self.final_norm_name


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "llama", "Llama"),
    "mistral": Architecture("mistral", "mistral", "Mistral"),
    "qwen2": Architecture("qwen2", "qwen2", "Qwen2"),
    "qwen3": Architecture("qwen3", "qwen3", "Qwen3", norms=("input_layernorm", "post_attention_layernorm") + _QK_NORMS),
    "gemma3_text": Architecture(
        "gemma3_text",
        "gemma3",
        "Gemma3",
        norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        )
        + _QK_NORMS,
        mlp_norm="pre_feedforward_layernorm",
        output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_offset=1.0,
        embed_scaled=True,
        rotary_per_layer_type=True,
    ),
}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(model_type, list(ARCHITECTURES)) from None


def load_config(config_dict: dict[str, Any]):
    """A transformers config object for the family named in `config_dict['model_type']`.

    Here rather than with the torch pieces because the checkpoint reader (infra) builds it from
    config.json, and infra must not depend on the math."""
    from transformers import AutoConfig

    model_type = config_dict.get("model_type", "<missing>")
    architecture_for(model_type)
    config = AutoConfig.for_model(**config_dict)
    # sdpa with an explicit mask is exact and needs no extra package
    config._attn_implementation = "sdpa"
    return config
