"""Fixtures shared by the block-level solver tests: block 2 of the real stories260K model with
its real inputs, and a one-thread setting for tiny tensors. Import both names into a test module."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerquant.infra.texts import load_tokenizer, tokenize
from layerquant.solvers.architectures import BlockContext, architecture_for

SEQ = 128
BLOCK = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny 64-wide tensors: a second intra-op thread buys nothing, and on a busy 2-core machine
    its spin-waiting made these files up to 8x slower (93 s vs 11 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def real_block(stories_model, calib_text, eval_text):
    """Block 2 of stories260K with its real inputs: 32 calibration sequences to fit on and 16
    sequences of the evaluation text, never seen while fitting, to judge on; and the weight of
    the norm that reads its output (block 3's input norm)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(stories_model)
    train = tokenize(tokenizer, Path(calib_text).read_text(encoding="utf-8")[:100_000])[: 32 * SEQ].reshape(32, SEQ)
    test = tokenize(tokenizer, Path(eval_text).read_text(encoding="utf-8")[:60_000])[: 16 * SEQ].reshape(16, SEQ)
    with torch.no_grad():
        x_train = model(train, output_hidden_states=True).hidden_states[BLOCK]
        x_test = model(test, output_hidden_states=True).hidden_states[BLOCK]
    arch = architecture_for("llama")
    context = BlockContext(arch, model.config, SEQ)
    block = model.model.layers[BLOCK]
    kwargs = context.block_kwargs(BLOCK)
    with torch.no_grad():
        y_train, y_test = block(x_train, **kwargs), block(x_test, **kwargs)
    next_norm_weight = model.model.layers[BLOCK + 1].input_layernorm.weight.detach().clone()
    return dict(block=block, arch=arch, context=context, kwargs=kwargs, x_train=x_train, x_test=x_test, y_train=y_train, y_test=y_test,
                next_norm_weight=next_norm_weight)
