"""The quantized model as it runs: fake-quantized activations at every quantized linear's input,
a fake-quantized KV cache, and the online rotations that could not be folded into weights.

Everything is attached to the family's own transformers block (forward pre-hooks on the linears,
a cache object passed as `past_key_values`), so the block's forward stays transformers' code:
the same hooks serve GPTQ's calibration pass (its Hessians then see the inputs the layers will
really get) and the streamed evaluation.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from layerquant.runtime_quant import ABSMAX_ACT_GRID_BITS, ACT_CLIP_MIN, ACT_CLIP_SUFFIX, CLIP_SEARCH_RATIOS, FLOAT_BITS, RuntimeQuant


def fake_quant_symmetric(x: torch.Tensor, bits: int, group_size: int = 0, clip: torch.Tensor | None = None,
                         search: bool = False) -> torch.Tensor:
    """Round x to a symmetric signed `bits` grid, one scale per row of the last dimension (or per
    `group_size` channels of it): what a per-token dynamic int activation kernel computes.

    Below 8 bits the grid is the weights' signed full range (solvers/grid.py): the row's value
    of largest magnitude lands exactly on the outermost level -2**(bits-1) and the scale carries
    its sign, so all 2**bits codes are used (absmax / (2**(bits-1) - 1) leaves one unused and
    wastes half a step on each side: Gemma 3 270M's A3 perplexity falls 5x, bench/activation_grid.py).
    At 8 bits the scale is absmax / 127, what vLLM's dynamic per-token int8 kernels compute, so a
    packed A8 model is measured as it is served.

    `clip` (a scalar tensor, used clamped to [ACT_CLIP_MIN, 1]) shrinks every scale to clip x
    that scale: values beyond are clipped, the rest rounded more finely. When it requires grad
    (block tuning trains it), its gradient is LSQ's (the rounding passed straight through, the
    clipped values pulling the other way) and x's is the identity.

    `search`: each row's scale further shrunk by the ratio of CLIP_SEARCH_RATIOS with the least
    squared rounding error on that row (on top of `clip`); the choice itself passes no gradient."""
    shape = x.shape
    groups = x.reshape(*shape[:-1], -1, group_size) if group_size and shape[-1] % group_size == 0 else x.unsqueeze(-2)
    top = 2 ** (bits - 1) - 1
    full_scale = _activation_scale(groups.detach(), bits)
    fixed_clip = None if clip is None else clip.detach().clamp(ACT_CLIP_MIN, 1.0)
    if search:
        rows = groups.detach()
        searched = full_scale if fixed_clip is None else full_scale * fixed_clip
        full_scale = full_scale * _least_error_ratio(rows, lambda ratio: _round_symmetric(rows, searched * ratio, top))
    if clip is None or not (clip.requires_grad and torch.is_grad_enabled()):
        scale = full_scale if fixed_clip is None else full_scale * fixed_clip
        return _straight_through(x, _round_symmetric(groups, scale, top).reshape(shape))
    scale = full_scale * clip.clamp(ACT_CLIP_MIN, 1.0)
    scaled = groups.detach() / scale
    codes = torch.clamp(scaled + (torch.round(scaled) - scaled).detach(), -top - 1, top)
    return (codes * scale).reshape(shape) + (x - x.detach())


def _round_symmetric(groups: torch.Tensor, scale: torch.Tensor, top: int) -> torch.Tensor:
    return torch.clamp(torch.round(groups / scale), -top - 1, top) * scale


def _activation_scale(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """One (signed, below 8 bits) scale per row of `groups`' last dimension (see fake_quant_symmetric)."""
    top = 2 ** (bits - 1) - 1
    if bits >= ABSMAX_ACT_GRID_BITS:
        return groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / top
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))
    # a row of zeros gets a tiny positive extreme, which still maps 0 to exactly 0
    extreme = torch.where(extreme.abs() < 1e-8, torch.full_like(extreme, 1e-8), extreme)
    return -extreme / (top + 1)


def fake_quant_asymmetric(x: torch.Tensor, bits: int, group_size: int = 0, search: bool = False) -> torch.Tensor:
    """Round x to an unsigned `bits` grid between each row's (or group's) min and max; with
    `search`, between min and max times the ratio of CLIP_SEARCH_RATIOS with the least squared
    rounding error on that row (both ends pulled toward zero, as QuaRot clips its cache)."""
    shape = x.shape
    groups = (x.reshape(*shape[:-1], -1, group_size) if group_size and shape[-1] % group_size == 0 else x.unsqueeze(-2)).detach()
    top = 2**bits - 1
    row_min, row_max = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)

    def rounded(ratio) -> torch.Tensor:
        low, high = row_min * ratio, row_max * ratio
        scale = (high - low).clamp(min=1e-8) / top
        return torch.clamp(torch.round((groups - low) / scale), 0, top) * scale + low

    return _straight_through(x, rounded(_least_error_ratio(groups, rounded) if search else 1.0).reshape(shape))


def _least_error_ratio(groups: torch.Tensor, rounded: Callable[[torch.Tensor | float], torch.Tensor]) -> torch.Tensor:
    """Per row of `groups` (last dimension), the ratio of CLIP_SEARCH_RATIOS whose `rounded(ratio)`
    is nearest the row in squared error (the first on ties, so the full range when clipping
    gains nothing); shaped to broadcast over the row."""
    best_ratio = best_error = None
    for ratio in CLIP_SEARCH_RATIOS:
        error = (rounded(ratio) - groups).pow(2).sum(dim=-1, keepdim=True)
        if best_error is None:
            best_ratio, best_error = torch.full_like(error, ratio), error
            continue
        better = error < best_error
        best_ratio, best_error = torch.where(better, ratio, best_ratio), torch.where(better, error, best_error)
    return best_ratio


def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """`quantized` in the forward pass; under autograd the gradient passes to x unchanged
    (straight-through estimator), so block tuning can train through the activation and cache
    quantizers (round's own gradient is zero: everything before a quantized linear would get
    none). Without autograd the values are returned as computed, to the last bit."""
    if not x.requires_grad:
        return quantized
    return x + (quantized - x).detach()


class FakeQuantKVCache:
    """Stands in for a transformers Cache in a block's forward: attention hands it keys (after
    RoPE) and values [batch, kv_heads, seq, head_dim] and attends to what it returns. Keys and
    values come back quantized per head and token (or group of head channels), except the first
    `prompt_tokens` positions, which stay float. Stateless: the streamed evaluation runs each
    window's whole sequence in one call, so "the cache" is that call's keys and values.

    `key_rotation` (QuaRot's R3, head_dim x head_dim orthogonal): keys are quantized in the
    rotated basis, k -> Q(k R3) R3^T. Attention then computes q . Q(k R3) R3^T = (q R3) . Q(k R3),
    exactly what rotating queries and keys online after RoPE and caching the rotated keys
    computes, without touching the attention code.

    `prompt_states` (layer index -> keys, values [1, kv_heads, prompt_tokens, head_dim]): the
    shared prompt's cache as the float model computed it (`RecordingCache`), used in place of
    the first `prompt_tokens` positions of every sequence: the prompt is computed once, offline,
    so its cache can be exact in value as well as in storage (IntactKV's lossless prefix). A
    layer without an entry keeps its own prompt positions, unquantized. With one prompt per
    sequence (batch dimension = the call's sequences), `for_rows` gives each batch its own. With
    `bits` 16 nothing is quantized (a float cache with an exact prompt). `search`: each entry's
    clipping ratio searched as it is quantized (RuntimeQuant.token_clip_search)."""

    def __init__(self, bits: int, group_size: int = 0, prompt_tokens: int = 0, key_rotation: torch.Tensor | None = None,
                 prompt_states: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None, search: bool = False):
        self.bits = bits
        self.search = search
        self.group_size = group_size
        self.prompt_tokens = prompt_tokens
        self.key_rotation = key_rotation
        self.prompt_states = prompt_states

    def _quantize(self, states: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
        if self.bits >= FLOAT_BITS:
            return states
        keep = min(self.prompt_tokens, states.shape[-2])
        rest = states[..., keep:, :]
        if rotation is not None:
            rotation = rotation.to(dtype=states.dtype, device=states.device)
            quantized = fake_quant_asymmetric(rest @ rotation, self.bits, self.group_size, self.search) @ rotation.T
        else:
            quantized = fake_quant_asymmetric(rest, self.bits, self.group_size, self.search)
        return torch.cat([states[..., :keep, :], quantized], dim=-2) if keep else quantized

    def for_rows(self, rows: slice) -> "FakeQuantKVCache":
        """The cache for sequences `rows` of the call (run_block's batch): prompt states kept per
        sequence are cut to those rows; a shared prompt's serve every batch as they are."""
        if self.prompt_states is None or all(keys.shape[0] == 1 for keys, _ in self.prompt_states.values()):
            return self
        batch = copy.copy(self)
        batch.prompt_states = {layer: (keys[rows], values[rows]) for layer, (keys, values) in self.prompt_states.items()}
        return batch

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self._quantize(key_states, self.key_rotation), self._quantize(value_states)
        exact = None if self.prompt_states is None else self.prompt_states.get(layer_idx)
        if exact is None:
            return keys, values
        return _with_prompt(keys, exact[0]), _with_prompt(values, exact[1])


def _with_prompt(states: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """`states` [batch, heads, seq, dim] with its first positions replaced by `prompt` [1 or batch, heads, P, dim]."""
    keep = min(prompt.shape[-2], states.shape[-2])
    head = prompt[..., :keep, :].to(states.dtype).expand(states.shape[0], -1, -1, -1)
    return torch.cat([head, states[..., keep:, :]], dim=-2)


class RecordingCache:
    """A float cache that keeps each layer's keys and values (as they would enter the cache) in
    `states`: the float model's pass over the prompt(s) fills FakeQuantKVCache.prompt_states.
    A pass in batches (run_block) appends each batch's rows to what the layer has so far."""

    def __init__(self, states: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.states = states

    def for_rows(self, rows: slice) -> "RecordingCache":
        return self

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = key_states.detach(), value_states.detach()
        if layer_idx in self.states:
            keys, values = (torch.cat([before, now]) for before, now in zip(self.states[layer_idx], (keys, values)))
        self.states[layer_idx] = (keys, values)
        return key_states, value_states


@dataclass
class BlockRuntime:
    """What one block does at run time beyond its weights: `online` maps a block-relative linear
    name to the orthogonal matrix its input is multiplied by first (QuaRot's online Hadamard at
    down_proj), `quantized` names the linears whose inputs are fake-quantized, `key_rotation` the
    rotation keys are quantized in (see FakeQuantKVCache)."""

    settings: RuntimeQuant
    quantized: tuple[str, ...] = ()
    online: Mapping[str, torch.Tensor] = field(default_factory=dict)
    key_rotation: torch.Tensor | None = None  # R3: keys quantized in a rotated basis
    # linear name -> its input's activation clipping ratio (a scalar tensor, read when the hook
    # runs: tuning trains it in place); absent: the full range
    act_clip: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def kv_cache(self, prompt_states: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> FakeQuantKVCache | None:
        """The cache the block attends through; `prompt_states`: the float model's cache of the
        shared prompt (see FakeQuantKVCache), given only by the streamed evaluation."""
        if not self.settings.quantizes_cache and prompt_states is None:
            return None
        return FakeQuantKVCache(self.settings.kv_bits, self.settings.kv_group_size, self.settings.prompt_kv_tokens, self.key_rotation,
                                prompt_states, self.settings.searches_cache)

    def without_quantizers(self) -> "BlockRuntime":
        """The same block with float activations and cache: only its online rotations, which
        belong to the float function of a rotated block (the float reference of tuning)."""
        settings = replace(self.settings, act_bits=FLOAT_BITS, kv_bits=FLOAT_BITS, token_clip_search=False)
        return replace(self, settings=settings)

    def install(self, block: nn.Module) -> list:
        """Register the pre-hooks on `block`; returns their handles (remove them to undo).
        Registered before any Hessian hook, so GPTQ's Hessians see the transformed inputs."""
        handles = []
        names = set(self.quantized) | set(self.online)
        for name in sorted(names):
            matrix = self.online.get(name)
            bits = self.settings.act_bits if name in self.quantized and self.settings.quantizes_activations else None
            if matrix is None and bits is None:
                continue
            handles.append(block.get_submodule(name).register_forward_pre_hook(
                _input_hook(matrix, bits, self.settings.act_group_size, self.act_clip.get(name), self.settings.searches_activations)))
        return handles


def _input_hook(matrix: torch.Tensor | None, bits: int | None, group_size: int, clip: torch.Tensor | None = None, search: bool = False):
    cache: dict = {}

    def transform(_module, args):
        x = args[0]
        if matrix is not None:
            key = (x.dtype, x.device)
            if key not in cache:
                cache[key] = matrix.to(dtype=x.dtype, device=x.device)
            x = x @ cache[key]
        if bits is not None:
            x = fake_quant_symmetric(x, bits, group_size, clip, search)
        return (x, *args[1:])

    return transform


def with_act_clips(runtime: BlockRuntime, groups, weights: Mapping[str, torch.Tensor]) -> tuple[BlockRuntime, dict[str, torch.Tensor]]:
    """A block's weights as a run hands them over may carry trained activation clipping ratios
    ("{first linear of a group}.act_clip", see runtime_quant.py): (the runtime with them, shared
    by every linear of the group, the weights without them, which build_block takes)."""
    from layerquant.runtime_quant import act_clip_key

    clips = {}
    for group in groups:
        key = act_clip_key(group[0])
        if key in weights:
            clips.update({name: weights[key] for name in group})
    if not clips:
        return runtime, dict(weights)
    rest = {name: value for name, value in weights.items() if not name.endswith(ACT_CLIP_SUFFIX)}
    return replace(runtime, act_clip=clips), rest


def remove_hooks(handles: Iterable) -> None:
    for handle in handles:
        handle.remove()
