"""Shared fixtures: the bundled real model and texts, tiny random models of every family, and
one Prefect test server for the whole session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from layerquant.config import default_calib, default_eval, default_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@pytest.fixture(scope="session")
def stories_model() -> str:
    return default_model()


@pytest.fixture(scope="session")
def calib_text() -> str:
    return default_calib()


@pytest.fixture(scope="session")
def eval_text() -> str:
    return default_eval()


@pytest.fixture(scope="session")
def prefect_server():
    """One real (temporary) Prefect API server for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def tiny_config(model_type: str):
    """A 2-block random model of the family with the bundled tokenizer's 512-token vocabulary."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if model_type == "llama":
        return LlamaConfig(**common)
    if model_type == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if model_type == "qwen2":
        return Qwen2Config(**common)
    if model_type == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if model_type == "gemma3_text":
        # a sliding window shorter than the sequences exercises the local-attention mask
        return Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=16, sliding_window=24,
                                layer_types=["sliding_attention", "full_attention"])
    raise ValueError(model_type)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, stories_model):
    """Factory: folder of a random tiny model of `model_type`, saved as safetensors."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(model_type))
            with torch.no_grad():  # norms away from their init so the (1 + w) form matters
                for name, param in model.named_parameters():
                    if "norm" in name:
                        param.add_(0.1 * torch.randn_like(param))
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            model.save_pretrained(folder)
            for name in TOKENIZER_FILES:
                shutil.copy(Path(stories_model) / name, folder / name)
            made[model_type] = folder
        return made[model_type]

    return make


def pytest_collection_modifyitems(items):
    """Mark every test that uses a real Prefect server (the session's `prefect_server`, or the
    deployment test's own `prefect_api`) as `server`, so `-m "not server"` can leave them out
    without each test having to remember its marker."""
    for item in items:
        if {"prefect_server", "prefect_api"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
