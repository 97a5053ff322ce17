"""Cutting a token stream into fixed-length windows, deterministically."""
from __future__ import annotations

import torch

from layerquant.errors import CalibrationError


def make_windows(
    tokens: torch.Tensor,
    n_windows: int,
    seq_len: int,
    bos: int | None,
    selection: str = "first",
    seed: int = 0,
    purpose: str = "calibration",
) -> torch.Tensor:
    """[n_windows, seq_len] int64: non-overlapping windows, each `bos` + seq_len-1 text tokens
    (or seq_len text tokens when the tokenizer has no BOS).

    selection "first" takes the first windows in order (what evaluation and the peers' reference
    runs use); "random" takes a seeded random subset of all non-overlapping windows.
    """
    if seq_len < 2:
        raise CalibrationError(f"{purpose} seqlen {seq_len} is too short", "use a sequence length of at least 2 (typically 256-2048)")
    if n_windows < 1:
        raise CalibrationError(f"{purpose} needs at least one window, got {n_windows}", "raise the sample / window count")
    body = seq_len - 1 if bos is not None else seq_len
    available = tokens.numel() // body
    if available < n_windows:
        raise CalibrationError(
            f"{purpose} text has {tokens.numel()} tokens: enough for {available} windows of {seq_len}, {n_windows} requested",
            "give more text, or lower the number of samples/windows or the sequence length",
        )
    if selection == "first":
        chosen = torch.arange(n_windows)
    elif selection == "random":
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(available, generator=generator)[:n_windows].sort().values
    else:
        raise CalibrationError(f"unknown window selection {selection!r}", "use 'first' or 'random'")
    starts = chosen * body
    rows = torch.stack([tokens[s : s + body] for s in starts.tolist()])
    if bos is not None:
        rows = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.int64), rows], dim=1)
    return rows


def prompt_windows(tokens: torch.Tensor, n_windows: int, seq_len: int, prompt_tokens: int, bos: int | None,
                   purpose: str = "evaluation") -> torch.Tensor:
    """[n_windows, seq_len] int64: one shared prompt (`bos` + the text's first tokens,
    `prompt_tokens` in all) before each of n_windows continuations cut, in order and without
    overlap, from the text after it. What the prompt-precision KV cache is judged on: the
    perplexity of the continuations (positions >= prompt_tokens), with and without the
    prompt's keys and values kept float, on the same windows."""
    if not 0 < prompt_tokens < seq_len:
        raise CalibrationError(f"{purpose} prompt of {prompt_tokens} tokens does not fit windows of {seq_len}",
                               "use prompt_kv_tokens smaller than the evaluation sequence length")
    head = prompt_tokens - 1 if bos is not None else prompt_tokens
    body = seq_len - prompt_tokens
    if tokens.numel() < head + n_windows * body:
        raise CalibrationError(f"{purpose} text has {tokens.numel()} tokens: too few for a {prompt_tokens}-token prompt and "
                               f"{n_windows} continuations of {body}", "give more text, or fewer / shorter windows")
    prompt = tokens[:head]
    if bos is not None:
        prompt = torch.cat([torch.tensor([bos], dtype=torch.int64), prompt])
    rest = tokens[head:]
    return torch.stack([torch.cat([prompt, rest[i * body : (i + 1) * body]]) for i in range(n_windows)])


def context_windows(tokens: torch.Tensor, n_windows: int, seq_len: int, prompt_tokens: int, bos: int | None,
                    purpose: str = "evaluation") -> torch.Tensor:
    """[n_windows, seq_len] int64: the continuations prompt_windows cuts, each after its own
    prompt: `bos` + the text right before it (`prompt_tokens` in all; for the first continuation
    the shared prompt itself). The shared prompt is one passage before continuations cut from
    elsewhere in the text, which need not read it; here every prompt is context its continuation
    reads, as a document or a conversation is before the answer."""
    shared = prompt_windows(tokens, n_windows, seq_len, prompt_tokens, bos, purpose)
    head = prompt_tokens - 1 if bos is not None else prompt_tokens
    body = seq_len - prompt_tokens
    # continuation i starts at text position head + i * body; its prompt is the head tokens before it
    before = torch.stack([tokens[i * body : i * body + head] for i in range(n_windows)])
    if bos is not None:
        before = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.int64), before], dim=1)
    return torch.cat([before, shared[:, prompt_tokens:]], dim=1)
