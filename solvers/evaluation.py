"""Streamed evaluation: perplexity, and the divergence of a model from a reference (the float model).

All windows go through block 0, then block 1, ... so only one block's weights and the windows'
hidden states are in memory at a time. The last hidden states are then scored window by window
(`score_window`), the LM head applied to a chunk of tokens at a time so that full logits of a
262k vocabulary never exist for more than `tokens_per_chunk` tokens.

Against a reference, the reference's last hidden states (computed the same way, by another pass
or read from the store) are scored side by side with the model's: per window, both models'
summed NLL and token count, and per token KL(reference || model) and whether the top-1
predictions agree. Per-window sums are kept, so two models measured on the same windows are
compared by their paired per-window differences (`paired_ratio`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

# logits kept per chunk and model: 2^24 floats (64 MiB); a 262k vocabulary gets 64 tokens a chunk
LOGITS_PER_CHUNK = 1 << 24

Head = Callable[[torch.Tensor], torch.Tensor]  # last hidden [T, H] -> logits [T, V]


def next_token_targets(windows: torch.Tensor) -> torch.Tensor:
    """targets[w, t] = windows[w, t + 1]; the last position predicts nothing (-100)."""
    return torch.cat([windows[:, 1:], torch.full((windows.shape[0], 1), -100, dtype=windows.dtype)], dim=1)


def stream_hidden(
    windows: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    blocks: Iterable[Callable[[torch.Tensor], torch.Tensor]],
) -> torch.Tensor:
    """Last-block hidden states [W, L, H] of `windows` [W, L]. `blocks` yields one callable per
    decoder block (hidden -> hidden), created lazily so weights are loaded block by block."""
    hidden = embed(windows)
    for block in blocks:
        hidden = block(hidden)
        del block  # before the next block is built: one block's weights in memory, not two
    return hidden


def tokens_per_chunk(vocab_size: int) -> int:
    return max(1, LOGITS_PER_CHUNK // max(vocab_size, 1))


@dataclass
class WindowScore:
    """One window's scores: summed NLL and token count of the model (and of the reference), the
    per-token KL(reference || model) and how many top-1 predictions agree."""

    nll: float
    tokens: int
    reference_nll: float | None = None
    kl: torch.Tensor | None = None  # [tokens], float64
    top1_agree: int = 0


@torch.no_grad()
def score_window(hidden: torch.Tensor, targets: torch.Tensor, head: Head, vocab_size: int,
                 reference_hidden: torch.Tensor | None = None, reference_head: Head | None = None) -> WindowScore:
    """Scores of one window: hidden [L, H] (and the reference's [L, H]), targets [L] (-100 = none).

    The head runs on `tokens_per_chunk(vocab_size)` tokens at a time; log-softmax in float32,
    sums in float64. KL(reference || model) = sum_v p_ref(v) (log p_ref(v) - log p(v)), so a model
    against itself gives exactly 0 (the same numbers on both sides)."""
    valid = targets >= 0
    hidden, targets = hidden[valid], targets[valid]
    compare = reference_hidden is not None
    if compare:
        reference_hidden = reference_hidden[valid]
        reference_head = reference_head or head
    nll = reference_nll = 0.0
    top1_agree = 0
    kls = []
    step = tokens_per_chunk(vocab_size)
    for start in range(0, hidden.shape[0], step):
        chunk_targets = targets[start : start + step]
        log_probs = torch.log_softmax(head(hidden[start : start + step]).float(), dim=-1)
        nll -= float(log_probs.gather(1, chunk_targets[:, None]).double().sum())
        if not compare:
            continue
        reference_log_probs = torch.log_softmax(reference_head(reference_hidden[start : start + step]).float(), dim=-1)
        reference_nll -= float(reference_log_probs.gather(1, chunk_targets[:, None]).double().sum())
        kls.append((reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(dim=-1).double())
        top1_agree += int((reference_log_probs.argmax(dim=-1) == log_probs.argmax(dim=-1)).sum())
    if not compare:
        return WindowScore(nll, int(targets.shape[0]))
    # a KL is never negative; rounding of two nearly equal distributions can make it -1e-9
    kl = torch.cat(kls).clamp_min(0.0) if kls else torch.zeros(0, dtype=torch.float64)
    return WindowScore(nll, int(targets.shape[0]), reference_nll, kl, top1_agree)


def perplexity_summary(window_nll: list[float], window_tokens: list[int]) -> dict:
    """Perplexity from per-window NLL sums, the standard error of the mean token NLL (windows as
    the independent samples: the noise level below which two perplexities on these windows
    cannot be told apart), and the per-window sums themselves (for paired comparisons)."""
    count = sum(window_tokens)
    mean = sum(window_nll) / count
    window_means = [total / n for total, n in zip(window_nll, window_tokens)]
    spread = sum((m - mean) ** 2 for m in window_means) / max(len(window_means) - 1, 1)
    return {"ppl": math.exp(mean), "nll": mean, "nll_std_err": math.sqrt(spread / len(window_means)), "tokens": count,
            "window_nll": window_nll, "window_tokens": window_tokens}


def score_windows(hidden: torch.Tensor, targets: torch.Tensor, head: Head, vocab_size: int,
                  reference_hidden: torch.Tensor | None = None, reference_head: Head | None = None) -> list[WindowScore]:
    """`score_window` for every window of hidden [W, L, H]."""
    return [score_window(hidden[row], targets[row], head, vocab_size,
                         None if reference_hidden is None else reference_hidden[row], reference_head)
            for row in range(hidden.shape[0])]


def summarize(scores: list[WindowScore]) -> dict:
    """The model's perplexity summary; with a reference, also the reference's, the divergence
    (mean and 99th percentile of the per-token KL, top-1 agreement) and the paired ratio."""
    tokens = [s.tokens for s in scores]
    result = perplexity_summary([s.nll for s in scores], tokens)
    if scores and scores[0].reference_nll is not None:
        reference = perplexity_summary([s.reference_nll for s in scores], tokens)
        kl = torch.cat([s.kl for s in scores])
        result |= {
            "reference": reference,
            "kl_mean": float(kl.mean()) if kl.numel() else 0.0,
            "kl_p99": float(torch.quantile(kl, 0.99)) if kl.numel() else 0.0,
            "top1_agreement": sum(s.top1_agree for s in scores) / max(sum(tokens), 1),
            "paired": paired_ratio(reference["window_nll"], result["window_nll"], tokens),
        }
    return result


def stream_perplexity(
    windows: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    blocks: Iterable[Callable[[torch.Tensor], torch.Tensor]],
    head: Head,
    vocab_size: int,
    reference_hidden: torch.Tensor | None = None,
    reference_head: Head | None = None,
    score_from: int = 0,
) -> tuple[dict, torch.Tensor]:
    """Perplexity of `windows` [W, L] (every token after the first predicted from its prefix),
    and, given the reference's last hidden states [W, L, H], the divergence from it (`summarize`).
    With `score_from` P > 0 only tokens at positions >= P are scored: the continuations after a
    shared P-token prompt (the prompt-precision KV cache's evaluation).
    Returns the summary and the model's last hidden states (a later comparison's reference)."""
    hidden = stream_hidden(windows, embed, blocks)
    targets = next_token_targets(windows)
    if score_from > 0:
        targets[:, : score_from - 1] = -100  # the target at position i is token i + 1
    scores = score_windows(hidden, targets, head, vocab_size, reference_hidden, reference_head)
    return summarize(scores), hidden


def paired_ratio(window_nll_a: list[float], window_nll_b: list[float], window_tokens: list[int],
                 confidence: float = 0.95) -> dict:
    """Perplexity of B over that of A on the same windows, with a confidence interval from the
    paired per-window differences.

    Token-weighted: the estimate is exp(r) with r = sum_w D_w / sum_w n_w, D_w the difference of
    the windows' summed NLLs (B - A) and n_w their token counts, so `ratio` is exactly ppl_B / ppl_A.
    Windows are the independent samples; the standard error of r is the ratio estimator's,
    sqrt(sum_w (D_w - r n_w)^2 / (W (W - 1))) / mean(n_w), which for windows of equal length
    (what make_windows cuts) is the plain standard error of the per-window mean differences. The
    interval is exp(r +- t_{W-1} se), t the Student quantile. A model against itself has every
    D_w = 0, hence exactly [1, 1]."""
    if not (len(window_nll_a) == len(window_nll_b) == len(window_tokens)) or not window_tokens:
        raise ValueError("paired windows must be the same, non-empty, set for both models")
    count = len(window_tokens)
    differences = [b - a for a, b in zip(window_nll_a, window_nll_b)]
    r = sum(differences) / sum(window_tokens)
    if count > 1:
        mean_tokens = sum(window_tokens) / count
        residual = sum((d - r * n) ** 2 for d, n in zip(differences, window_tokens))
        std_err = math.sqrt(residual / (count * (count - 1))) / mean_tokens
        half = t_quantile(0.5 + confidence / 2, count - 1) * std_err
    else:  # one window: no spread to estimate
        std_err, half = float("nan"), float("inf")
    return {"ratio": math.exp(r), "low": math.exp(r - half), "high": math.exp(r + half), "confidence": confidence,
            "nll_diff": r, "nll_diff_std_err": std_err, "windows": count}


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (0.5 < p < 1): bisection on the CDF, integrated by Simpson's rule
    (the density is smooth; 1e-9 relative accuracy is ample for an interval's bounds)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, steps: int = 2000) -> float:
        h = x / steps
        total = density(0.0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return 0.5 + total * h / 3

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, high * 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2
