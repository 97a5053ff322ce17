"""A whole model streamed block by block exactly as its quantized form runs: rotated weights,
online rotations, fake-quantized activations and KV cache. The one place that composes the
pieces of solvers/rotated.py and solvers/activations.py, for calibration (the embedding end),
reconstruction (each block's weights and run-time hooks) and the streamed evaluation."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from layerquant.runtime_quant import ACT_CLIP_SUFFIX, FLOAT_BITS, RuntimeQuant
from layerquant.solvers import architectures as arch_ops
from layerquant.solvers.activations import BlockRuntime, FakeQuantKVCache, RecordingCache, with_act_clips
from layerquant.solvers.evaluation import stream_perplexity
from layerquant.solvers.rotated import (
    Rotation,
    block_runtime,
    embedding_output_transform,
    final_norm_input_transform,
    plan_rotation,
    rotate_block_weights,
    rotate_embedding,
    rotate_head,
    unrotate_block_weights,
)


@dataclass(frozen=True)
class RuntimeModel:
    """How the model of a run is executed: `settings` and, when `settings.rotate`, the rotation."""

    arch: object
    config: object
    settings: RuntimeQuant
    rotation: Rotation | None

    @classmethod
    def plan(cls, arch, config, settings: RuntimeQuant, tied_embeddings: bool) -> "RuntimeModel":
        rotation = plan_rotation(arch, config, tied_embeddings, settings.seed) if settings.rotate else None
        return cls(arch, config, settings, rotation)

    def block_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A block's float weights as the run quantizes them (rotated when rotating)."""
        return weights if self.rotation is None else rotate_block_weights(self.arch, self.config, weights, self.rotation)

    def exported_block_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A block's run weights (as `block_weights` gave them, quantized layers dequantized) in
        the original basis, for a plain model folder: the rotations undone, the norms left
        folded; with the original embeddings, final norm and head the folder computes what the
        rotated run computes without activation quantization (so without its clipping ratios)."""
        weights = {name: value for name, value in weights.items() if not name.endswith(ACT_CLIP_SUFFIX)}
        return weights if self.rotation is None else unrotate_block_weights(self.arch, self.config, weights, self.rotation)

    def norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A norm's weight as the run sees the residual through it (what block tuning's
        "next_norm" space compares in): rotated, every norm's scale is folded into the linears
        after it, leaving a unit-scale RMSNorm (rotation-invariant, so also right where R1 is
        undone online before the final norm)."""
        if self.rotation is None or not self.rotation.residual_rotated:
            return weight
        return torch.full_like(weight, 1.0 - self.arch.norm_offset)

    def block_runtime(self) -> BlockRuntime | None:
        """The hooks a block runs with; None when nothing happens at run time (weight-only runs
        keep the exact code path they always had)."""
        if not self.settings.enabled:
            return None
        return block_runtime(self.arch, self.settings, self.rotation)

    def embed(self, embed_weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Block 0's inputs: the embedding of `tokens`, rotated."""
        hidden = arch_ops.embed_tokens(self.arch, self.config, self.embed_weight(embed_weight), tokens)
        online = embedding_output_transform(self.rotation)
        return hidden if online is None else (hidden.double() @ online).to(hidden.dtype)

    def embed_weight(self, embed_weight: torch.Tensor) -> torch.Tensor:
        return embed_weight if self.rotation is None else rotate_embedding(embed_weight, self.rotation)

    def head(self, final_norm_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rotation is None:
            return final_norm_weight, lm_head_weight
        return rotate_head(self.arch, final_norm_weight, lm_head_weight, self.rotation)

    def perplexity(
        self,
        windows: torch.Tensor,
        n_blocks: int,
        block_weights: Callable[[int], dict[str, torch.Tensor]],
        embed_weight: torch.Tensor,
        final_norm_weight: torch.Tensor,
        lm_head_weight: torch.Tensor,
        score_from: int = 0,
        batch_size: int = 8,
        between_blocks: Callable[[], None] | None = None,
        float_block_weights: Callable[[int], dict[str, torch.Tensor]] | None = None,
        prompt_states: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """Streamed perplexity of `windows`; `block_weights(index)` gives block `index`'s weights
        as the run uses them (already rotated, quantized layers dequantized). Only tokens at
        positions >= `score_from` are scored (continuations after a shared prompt).

        With `settings.prompt_kv_tokens` P and `float_block_weights(index)` (block `index`'s
        float weights as `block_weights` rotates them): the prompt-precision cache. The windows'
        first P tokens (the shared prompt, the same in every window) go once through the float
        blocks, and their keys and values take the place of the first P cache positions of every
        window: the prompt is computed once, offline, so its cache is the float model's, kept in
        float, while everything after it runs quantized. Windows that do not share their first P
        tokens each get the float model's cache of their own (each window's context, e.g. a
        document read before its continuation). Without `float_block_weights` the first P
        positions keep the quantized model's own keys and values, unquantized.

        `prompt_states` (layer index -> keys, values [1, kv_heads, P, head_dim]) gives the prompt's
        cache instead of the float model's (e.g. one calibrated for the quantized model; see
        bench/stories_prompt_cache.py); the windows must still share their first P tokens."""
        runtime = self.block_runtime()
        given = prompt_states is not None
        if given and self.shared_prompt(windows) is None:
            raise ValueError("prompt_states need settings.prompt_kv_tokens: the positions they stand for")
        prompt = None if float_block_weights is None or given else self.prompts(windows)
        prompt_states = prompt_states if given else (None if prompt is None else {})
        if runtime is not None:
            cache = runtime.kv_cache(prompt_states)
        elif prompt_states is not None:  # weight-only: a float cache whose prompt is the float model's
            cache = FakeQuantKVCache(FLOAT_BITS, prompt_tokens=self.settings.prompt_kv_tokens, prompt_states=prompt_states)
        else:
            cache = None
        context = arch_ops.BlockContext(self.arch, self.config, windows.shape[1], kv_cache=cache)
        float_prompt = None if prompt is None else self._float_prompt_pass(prompt, embed_weight, runtime, prompt_states)

        def blocks():
            for index in range(n_blocks):
                if between_blocks is not None:
                    between_blocks()
                if float_prompt is not None:
                    prompt_states.pop(index - 1, None)  # the previous block has read its prompt cache: one layer's at a time
                    float_prompt(index, float_block_weights(index))
                weights = block_weights(index)
                block_runtime = runtime
                if runtime is not None:  # trained activation clipping ratios come with the block's weights
                    block_runtime, weights = with_act_clips(runtime, self.arch.linear_groups, weights)
                block = arch_ops.build_block(self.arch, self.config, index, weights)
                if block_runtime is not None:
                    block_runtime.install(block)
                yield lambda hidden, block=block, index=index: arch_ops.run_block(block, context, index, hidden, batch_size)

        norm_weight, head = self.head(final_norm_weight, lm_head_weight)
        norm = arch_ops.family_norm(self.arch, self.config, norm_weight)
        unrotate = final_norm_input_transform(self.rotation)
        softcap = getattr(self.config, "final_logit_softcapping", None)

        def logits(hidden):
            if unrotate is not None:
                hidden = (hidden.double() @ unrotate).to(hidden.dtype)
            return arch_ops.head_logits(hidden, norm, head, softcap)

        return stream_perplexity(windows, lambda tokens: self.embed(embed_weight, tokens), blocks(), logits, int(head.shape[0]),
                                 score_from=score_from)[0]

    def prompts(self, windows: torch.Tensor) -> torch.Tensor | None:
        """The prompt whose float cache the windows use: [1, P] when every window starts with it,
        else each window's own first P tokens [W, P] (P = settings.prompt_kv_tokens; None when 0)."""
        length = self.settings.prompt_kv_tokens
        if not length:
            return None
        if windows.shape[1] <= length:
            raise ValueError(f"windows of {windows.shape[1]} tokens leave nothing after a {length}-token prompt; "
                             "use longer windows or a shorter prompt_kv_tokens")
        prompt = windows[:, :length]
        return prompt[:1] if torch.equal(prompt, prompt[:1].expand_as(prompt)) else prompt

    def shared_prompt(self, windows: torch.Tensor) -> torch.Tensor | None:
        """The prompt [1, P] every window starts with (None when P is 0). Refuses windows that do
        not share it: one given prompt cache cannot stand for several prompts."""
        prompt = self.prompts(windows)
        if prompt is not None and prompt.shape[0] > 1:
            raise ValueError(f"the windows do not share their first {prompt.shape[1]} tokens: cut them with "
                             "solvers.windows.prompt_windows (one shared prompt before each continuation)")
        return prompt

    def float_prompt_states(self, prompt: torch.Tensor, n_blocks: int, float_block_weights: Callable[[int], dict[str, torch.Tensor]],
                            embed_weight: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The float model's cache of `prompt` [1, P] (or one prompt per window, [W, P]): layer
        index -> (keys, values), as the prompt-precision cache of `perplexity` holds them."""
        states: dict = {}
        run = self._float_prompt_pass(prompt, embed_weight, self.block_runtime(), states)
        for index in range(n_blocks):
            run(index, float_block_weights(index))
        return states

    def _float_prompt_pass(self, prompt: torch.Tensor, embed_weight: torch.Tensor, runtime: BlockRuntime | None,
                           states: dict) -> Callable[[int, dict[str, torch.Tensor]], None]:
        """A function that runs the prompt through float block `index` (online rotations, no
        quantizers) and records the keys and values it caches in `states[index]`; called for
        each block in order, before that block's quantized pass reads them."""
        context = arch_ops.BlockContext(self.arch, self.config, prompt.shape[1], kv_cache=RecordingCache(states))
        float_runtime = None if runtime is None else runtime.without_quantizers()
        hidden = self.embed(embed_weight, prompt)

        def run(index: int, weights: dict[str, torch.Tensor]) -> None:
            nonlocal hidden
            block = arch_ops.build_block(self.arch, self.config, index, weights)
            if float_runtime is not None:
                float_runtime.install(block)
            hidden = arch_ops.run_block(block, context, index, hidden)

        return run
