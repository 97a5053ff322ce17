"""Perplexity computed block by block: all windows go through block 0, then block 1, ...
so only one block's weights and the windows' hidden states are in memory at a time."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def stream_perplexity(
    windows: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    blocks: Iterable[Callable[[torch.Tensor], torch.Tensor]],
    nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    score_from: int = 0,
) -> dict[str, float]:
    """Perplexity of `windows` [W, L]: every token after the first is predicted from its prefix.

    `blocks` yields one callable per decoder block (hidden [W, L, H] -> hidden), created lazily
    so weights are loaded block by block; `nll(hidden[L, H], targets[L])` is the summed NLL.
    With `score_from` P > 0 only tokens at positions >= P are scored: the continuations after a
    shared P-token prompt (the prompt-precision KV cache's evaluation).
    """
    hidden = embed(windows)
    for block in blocks:
        hidden = block(hidden)
    targets = torch.cat([windows[:, 1:], torch.full((windows.shape[0], 1), -100, dtype=windows.dtype)], dim=1)
    if score_from > 0:
        targets[:, : score_from - 1] = -100  # the target at position i is token i + 1
    per_window = [float(nll(hidden[row], targets[row])) for row in range(windows.shape[0])]
    counts = (targets >= 0).sum(dim=1).tolist()
    count = sum(counts)
    mean = sum(per_window) / count
    # standard error of the mean token NLL, treating windows as the independent samples: the
    # noise level below which two perplexities on these windows cannot be told apart
    window_means = [total / n for total, n in zip(per_window, counts)]
    spread = sum((m - mean) ** 2 for m in window_means) / max(len(window_means) - 1, 1)
    return {"ppl": math.exp(mean), "nll": mean, "nll_std_err": math.sqrt(spread / len(window_means)), "tokens": count}
