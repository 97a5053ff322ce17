"""Perplexity of a saved model folder computed by plain transformers: the independent check
that what layerquant wrote is what its report measured."""
from __future__ import annotations

import math

import torch


def transformers_perplexity(model_dir, eval_text: str, n_windows: int, seq_len: int = 256, tokenizer_dir=None) -> float:
    """exp(mean token NLL) of `model_dir` on the first `n_windows` BOS-prefixed windows of
    `eval_text`, cut as layerquant's evaluator cuts them. The tokenizer comes from
    `tokenizer_dir` (default: the model folder)."""
    from transformers import AutoModelForCausalLM

    from layerquant.infra.texts import load_tokenizer, read_text, tokenize
    from layerquant.solvers.windows import make_windows

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    windows = make_windows(tokenize(tokenizer, read_text(eval_text)), n_windows, seq_len, tokenizer.bos_token_id)
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())
