"""Settings of what a quantized model quantizes while it runs: activations, the KV cache, and the
rotations that make low-bit activations usable (issue 16, after QuaRot and BiSup).

Core rather than solvers for the reason `tuning.py` is: the run config builds these settings and
the block and evaluation keys include them, neither of which may depend on the math that uses
them (solvers/activations.py, solvers/rotated.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from layerquant.errors import InvalidSpec

FLOAT_BITS = 16  # "not quantized": activations and cache stay in the model's float type
ACT_BITS = (3, 4, 8, FLOAT_BITS)
# activations this wide or wider use vLLM's dynamic int8 grid, absmax / (2**(bits-1) - 1), so a
# packed A8 model is measured as served; narrower ones, which no serving kernel runs, the weights'
# signed full range (solvers/activations.py), named in their keys since it changed on 2026-12-05
ABSMAX_ACT_GRID_BITS = 8
LOW_BIT_ACT_GRID = "signed-full-range"
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength (its paper's default)
# a trained activation clipping ratio travels with its block's weights (and in the block
# artifact, as an override) under "{first linear of its input group}.act_clip": one scalar per
# quantized input, shared by the linears that read it (q/k/v, gate/up), as a fused kernel
# quantizes their common input once
ACT_CLIP_SUFFIX = ".act_clip"
ACT_CLIP_MIN = 0.2  # a ratio is used clamped to [ACT_CLIP_MIN, 1]: at most 80% of a token's range cut off
# `token_clip_search`: each token's (or group's) scale below 8 bits is the one, among its full-range
# scale times these ratios, with the least squared rounding error on that token. On Gemma 3 270M
# the chosen ratios lie between 1.0 and 0.65 for 99% of 3-bit rows and 1.0 and 0.8 at 4 bits
# (bench/gemma_runtime_floor.py --token-clip-search), so the candidates stop at 0.6
CLIP_SEARCH_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
CLIP_SEARCH_BELOW_BITS = 8  # 8-bit activations keep vLLM's absmax grid (measured as served)


def act_clip_key(linear: str) -> str:
    return linear + ACT_CLIP_SUFFIX


@dataclass(frozen=True)
class RuntimeQuant:
    """Activations: per-token dynamic symmetric fake-quant at the input of every quantized linear
    (`act_group_size` 0 = one scale per token, else one per group of input channels). KV cache:
    keys (after RoPE) and values quantized per head and token (or group of head channels) as
    they enter the cache, asymmetric (min/max) as QuaRot and KIVI quantize the cache, except the
    first `prompt_kv_tokens` positions, which stay float (BiSup's prompt-precision cache: the
    shared system prompt is computed once, so keeping it exact costs little memory and stops its
    error from spreading to every later token). Calibration keeps those positions unquantized;
    the evaluation, whose windows share one prompt, takes them from the float model (IntactKV's
    lossless prefix: solvers/runtime_model.py). `rotate`: QuaRot's Hadamard rotations
    (solvers/rotated.py). `smooth`: SmoothQuant's scale migration instead (solvers/smooth.py).
    `token_clip_search`: below 8 bits, activations and cache entries are rounded with the per-token
    (per-group) scale of least squared error among CLIP_SEARCH_RATIOS of the full range, found
    as they are quantized (an MSE clipping search, done once per token as a kernel would)."""

    act_bits: int = FLOAT_BITS
    act_group_size: int = 0
    kv_bits: int = FLOAT_BITS
    kv_group_size: int = 0
    prompt_kv_tokens: int = 0
    rotate: bool = False
    smooth: bool = False
    seed: int = 0  # the random signs of the residual rotation
    token_clip_search: bool = False

    def __post_init__(self):
        for name in ("act_bits", "kv_bits"):
            if getattr(self, name) not in ACT_BITS:
                raise InvalidSpec(f"{name}={getattr(self, name)} is not supported", f"use one of {', '.join(map(str, ACT_BITS))} (16 = float)")
        for name in ("act_group_size", "kv_group_size", "prompt_kv_tokens"):
            if getattr(self, name) < 0:
                raise InvalidSpec(f"{name}={getattr(self, name)} is negative", "use 0 (off / per token) or a positive size")
        if self.smooth and self.rotate:
            raise InvalidSpec("smooth and rotate are alternatives: the rotation folds the norm scales that smoothing would move",
                              "choose one of --smooth and --rotate")
        if self.token_clip_search and not (self.searches_activations or self.searches_cache):
            raise InvalidSpec("token_clip_search chooses the scales of activations or a KV cache below 8 bits, and this run quantizes neither",
                              "set act_bits or kv_bits to 3 or 4, or leave token_clip_search off")

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < FLOAT_BITS

    @property
    def quantizes_cache(self) -> bool:
        return self.kv_bits < FLOAT_BITS

    @property
    def searches_activations(self) -> bool:
        return self.token_clip_search and self.act_bits < CLIP_SEARCH_BELOW_BITS

    @property
    def searches_cache(self) -> bool:
        return self.token_clip_search and self.kv_bits < CLIP_SEARCH_BELOW_BITS

    @property
    def enabled(self) -> bool:
        return self.quantizes_activations or self.quantizes_cache or self.rotate or self.smooth

    def identity(self) -> dict:
        """The settings that change a result; empty when nothing is on, so weight-only runs keep
        their keys. The prompt length matters only with a quantized cache."""
        out: dict = {}
        if self.quantizes_activations:
            out["act"] = {"bits": self.act_bits, "group_size": self.act_group_size}
            if self.act_bits < ABSMAX_ACT_GRID_BITS:  # runs on the older absmax grid must not be reused
                out["act"]["grid"] = LOW_BIT_ACT_GRID
            if self.searches_activations:
                out["act"]["clip_search"] = list(CLIP_SEARCH_RATIOS)
        if self.quantizes_cache:
            out["kv"] = {"bits": self.kv_bits, "group_size": self.kv_group_size, "prompt_tokens": self.prompt_kv_tokens}
            if self.searches_cache:
                out["kv"]["clip_search"] = list(CLIP_SEARCH_RATIOS)
        if self.rotate:
            out["rotate"] = {"seed": self.seed}
        if self.smooth:
            out["smooth"] = {"alpha": SMOOTH_ALPHA}
        return out
