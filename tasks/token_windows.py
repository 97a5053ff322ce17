"""Token windows of the calibration and evaluation texts, tokenized once per store.

Loading a tokenizer and tokenizing a text cost seconds (about 4 s for Gemma 3's 33 MB
tokenizer, on every load), and a run needs the windows four times: the preflight check, the
calibration capture and the two evaluations. The windows are stored under a key made of the
text's content, the tokenizer files' content and the window settings, so the first of those
tokenizes and the others (and every later run on the same store) read a small tensor back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerquant.config import CODE_VERSION, RunConfig
from layerquant.infra.store import ArtifactStore, artifact_key, sha256_bytes
from layerquant.infra.texts import load_tokenizer, read_text, tokenize
from layerquant.solvers.windows import context_windows, make_windows, prompt_windows
from layerquant.tasks.context import cached

STAGE = "windows"
# what decides how a text tokenizes, besides the text (the weights do not)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
PURPOSES = ("calibration", "evaluation")


def tokenizer_fingerprint(model_dir: str) -> str:
    files = [Path(model_dir) / name for name in TOKENIZER_FILES]
    return sha256_bytes(b"".join(name.encode() + sha256_bytes(path.read_bytes()).encode() for name, path in
                                 zip(TOKENIZER_FILES, files) if path.is_file()))


def window_settings(config: RunConfig, purpose: str, text_index: int = 0) -> dict[str, Any]:
    """Which text (the `text_index`-th evaluation text) and how it is cut into windows."""
    if purpose == "calibration":
        return {"text": config.calib, "n": config.nsamples, "seqlen": config.seqlen, "selection": config.calib_selection,
                "seed": config.seed}
    if purpose == "evaluation":
        settings = {"text": config.eval_texts()[text_index], "n": config.eval_windows, "seqlen": config.eval_seqlen,
                    "selection": "first", "seed": 0}
        if config.prompt_kv_tokens:  # continuations after one shared prompt, scored from prompt_kv_tokens on
            settings["prompt_tokens"] = config.prompt_kv_tokens
            if config.prompt_kv_eval == "own-context":  # absent otherwise: shared-prompt windows keep their keys
                settings["prompt_context"] = "own"
        return settings
    raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")


def token_windows(store: ArtifactStore, config: RunConfig, purpose: str, logger=None, text_index: int = 0) -> torch.Tensor:
    """[n, seqlen] int64 windows of the run's calibration text or `text_index`-th evaluation
    text (see make_windows); raises CalibrationError when the text is too short, as make_windows does."""
    return all_token_windows(store, config, [(purpose, text_index)], logger)[purpose, text_index]


def all_token_windows(store: ArtifactStore, config: RunConfig, requests: list[tuple[str, int]],
                      logger=None) -> dict[tuple[str, int], torch.Tensor]:
    """token_windows for several (purpose, text index) requests, loading the tokenizer at most once."""
    tokenizer = None

    def the_tokenizer():
        nonlocal tokenizer
        tokenizer = tokenizer or load_tokenizer(config.model)
        return tokenizer

    windows = {}
    for purpose, text_index in requests:
        settings = window_settings(config, purpose, text_index)
        # the tokenizer is loaded for a chat dataset only (its template renders the messages)
        text = read_text(settings["text"], config.text_encoding, config.text_column, the_tokenizer)
        params = {k: v for k, v in settings.items() if k != "text"} | {"purpose": purpose}
        key = artifact_key(STAGE, CODE_VERSION, [sha256_bytes(text.encode()), tokenizer_fingerprint(config.model)], params)
        hit = cached(store, STAGE, key, logger)
        if hit is not None:
            windows[purpose, text_index] = store.get_tensors(hit)[0]["tokens"]
            continue
        tokens = tokenize(the_tokenizer(), text)
        if settings.get("prompt_context") == "own":
            windows[purpose, text_index] = context_windows(tokens, settings["n"], settings["seqlen"], settings["prompt_tokens"],
                                                           tokenizer.bos_token_id, purpose=purpose)
        elif "prompt_tokens" in settings:
            windows[purpose, text_index] = prompt_windows(tokens, settings["n"], settings["seqlen"], settings["prompt_tokens"],
                                                          tokenizer.bos_token_id, purpose=purpose)
        else:
            windows[purpose, text_index] = make_windows(tokens, settings["n"], settings["seqlen"], tokenizer.bos_token_id,
                                                        settings["selection"], settings["seed"], purpose=purpose)
        store.put_tensors(STAGE, key, {"tokens": windows[purpose, text_index]}, {"stage": STAGE, **params})
    return windows
