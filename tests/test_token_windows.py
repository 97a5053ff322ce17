"""Token windows are tokenized once per store and read back after that (tasks/token_windows.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from layerquant.config import RunConfig
from layerquant.infra.store import open_store
from layerquant.infra.texts import load_tokenizer, read_text, tokenize
from layerquant.solvers.windows import context_windows, make_windows, prompt_windows
from layerquant.tasks import token_windows as windows_module
from layerquant.tasks.token_windows import all_token_windows, token_windows


def _config(model: str, store, calib_text: str, eval_text: str, **extra) -> RunConfig:
    return RunConfig.from_sources(None, model=model, calib=calib_text, eval=eval_text, store=str(store), nsamples=16, seqlen=64,
                                  eval_windows=8, eval_seqlen=128, **extra)


def test_windows_equal_a_fresh_tokenization_and_come_back_from_the_store(tmp_path, stories_model, calib_text, eval_text, monkeypatch):
    config = _config(stories_model, tmp_path / "store", calib_text, eval_text, calib_selection="random", seed=3)
    store = open_store(config.store)
    first = {purpose: windows for (purpose, _), windows in
             all_token_windows(store, config, [("calibration", 0), ("evaluation", 0)]).items()}

    tokenizer = load_tokenizer(stories_model)
    calib_tokens = tokenize(tokenizer, read_text(calib_text))
    assert torch.equal(first["calibration"], make_windows(calib_tokens, 16, 64, tokenizer.bos_token_id, "random", 3))
    eval_tokens = tokenize(tokenizer, read_text(eval_text))
    assert torch.equal(first["evaluation"], make_windows(eval_tokens, 8, 128, tokenizer.bos_token_id, "first"))

    def no_tokenizer(model):
        raise AssertionError("the tokenizer was loaded although the store has the windows")

    monkeypatch.setattr(windows_module, "load_tokenizer", no_tokenizer)
    assert torch.equal(token_windows(store, config, "calibration"), first["calibration"])
    assert torch.equal(token_windows(store, config, "evaluation"), first["evaluation"])
    # other settings are other windows: the store's copy is not reused for them
    with pytest.raises(AssertionError, match="tokenizer was loaded"):
        token_windows(store, config.model_copy(update={"seed": 4}), "calibration")


def test_another_tokenizer_does_not_reuse_the_windows(tmp_path, stories_model, calib_text, eval_text, monkeypatch):
    config = _config(stories_model, tmp_path / "store", calib_text, eval_text)
    store = open_store(config.store)
    token_windows(store, config, "evaluation")
    # the same weights with other tokenizer settings: the key follows the tokenizer files
    other = tmp_path / "model"
    shutil.copytree(stories_model, other)
    settings = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(settings | {"model_max_length": 123456}))

    def tripwire(model):
        raise AssertionError(f"tokenizer of {model} loaded")

    monkeypatch.setattr(windows_module, "load_tokenizer", tripwire)
    token_windows(store, config, "evaluation")
    with pytest.raises(AssertionError, match="tokenizer of .*model loaded"):
        token_windows(store, config.model_copy(update={"model": str(other)}), "evaluation")


def test_prompt_windows_share_one_prompt_and_own_context_windows_read_the_text_before(tmp_path, stories_model, calib_text, eval_text):
    """--prompt-kv-tokens: every evaluation window is one shared prompt (BOS + the text's first
    tokens) + a continuation; --prompt-kv-eval own-context: the same continuations, each after BOS
    + the text right before it. Both stored under their own keys."""
    config = _config(stories_model, tmp_path / "store", calib_text, eval_text, prompt_kv_tokens=16)
    store = open_store(config.store)
    shared = token_windows(store, config, "evaluation")
    own = token_windows(store, config.model_copy(update={"prompt_kv_eval": "own-context"}), "evaluation")
    tokenizer = load_tokenizer(stories_model)
    tokens, bos = tokenize(tokenizer, read_text(eval_text)), tokenizer.bos_token_id
    assert torch.equal(shared, prompt_windows(tokens, 8, 128, 16, bos)) and torch.equal(own, context_windows(tokens, 8, 128, 16, bos))
    assert torch.equal(shared[:, 16:], own[:, 16:]) and torch.equal(shared[0], own[0])
    assert (shared[:, :16] == shared[:1, :16]).all() and not (own[:, :16] == own[:1, :16]).all()
    assert (own[:, 0] == bos).all()
    for i in range(1, 8):  # continuation i starts at text position 15 + 112 i; its prompt is the 15 tokens before
        start = 15 + 112 * i
        assert torch.equal(own[i, 1:], tokens[start - 15 : start + 112])


def test_a_one_token_prompt_is_bos_and_its_windows_are_the_plain_ones(tmp_path, stories_model, calib_text, eval_text):
    """--prompt-kv-tokens 1 keeps only BOS's keys and values float (the attention sink, IntactKV's
    pivot token): its evaluation windows are then exactly the plain ones, so the run's perplexity
    is comparable with a run without it on the same windows (bench/gemma_bisup.py's ppl_float_bos)."""
    config = _config(stories_model, tmp_path / "store", calib_text, eval_text)
    store = open_store(config.store)
    plain = token_windows(store, config, "evaluation")
    sink = token_windows(store, config.model_copy(update={"prompt_kv_tokens": 1}), "evaluation")
    assert torch.equal(sink, plain) and (sink[:, 0] == load_tokenizer(stories_model).bos_token_id).all()
