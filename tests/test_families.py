"""Every supported family: a streamed block computes what transformers computes, and the whole
pipeline runs end to end and exports a model transformers loads."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import FAMILIES
from layerquant.config import RunConfig
from layerquant.errors import UnsupportedArchitecture
from layerquant.infra.checkpoint import CheckpointReader
from layerquant.solvers import architectures as arch_ops
from support.perplexity import transformers_perplexity


@pytest.mark.parametrize("model_type", FAMILIES)
def test_streamed_blocks_equal_transformers_blocks(tiny_model_dir, model_type):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(model_type)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    tokens = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, kwargs, out, i=i: captured.__setitem__(i, (kwargs.get("hidden_states", args[0] if args else None), out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        reference_logits = model(tokens).logits
    for hook in hooks:
        hook.remove()

    reader = CheckpointReader(folder)
    context = arch_ops.BlockContext(reader.arch, reader.config, tokens.shape[1])
    hidden = arch_ops.embed_tokens(reader.arch, reader.config, reader.embed_weight(), tokens)
    torch.testing.assert_close(hidden, captured[0][0], rtol=0, atol=0)
    for index in range(reader.n_blocks):
        block = arch_ops.build_block(reader.arch, reader.config, index, reader.block_weights(index))
        hidden = arch_ops.run_block(block, context, index, hidden)
        torch.testing.assert_close(hidden, captured[index][1], rtol=1e-5, atol=1e-5)
    # streamed head: NLL equals transformers' cross entropy on its own logits
    norm = arch_ops.family_norm(reader.arch, reader.config, reader.final_norm_weight())
    targets = torch.cat([tokens[0, 1:], torch.tensor([-100])])
    ours = arch_ops.token_nll(hidden[0], norm, reader.lm_head_weight(), targets, getattr(reader.config, "final_logit_softcapping", None), vocab_chunk=100)
    theirs = torch.nn.functional.cross_entropy(reference_logits[0, :-1], tokens[0, 1:], reduction="sum")
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


@pytest.mark.slow  # a whole run per family: ~15 s each plus the Prefect server's start
@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_quantizes_end_to_end(tiny_model_dir, tmp_path, model_type, calib_text, eval_text):
    from layerquant.flows.quantize import quantize_flow

    folder = tiny_model_dir(model_type)
    out = tmp_path / "out"
    config = RunConfig(model=str(folder), calib=calib_text, eval=eval_text, nsamples=8, seqlen=48, eval_windows=4,
                       eval_seqlen=48, bits=4, group_size=32, store=str(tmp_path / "store"), out=str(out))
    report = quantize_flow(config.model_dump())
    assert report["model_type"] == model_type
    assert len(report["layers"]) == 7 * 2
    assert all(0 <= layer["error"] < 0.1 for layer in report["layers"])
    # random weights: perplexity near the vocabulary size, and 4-bit barely moves it
    assert abs(math.log(report["ppl_quant"]) - math.log(report["ppl_fp"])) < 0.05
    assert transformers_perplexity(out, eval_text, 4, 48, tokenizer_dir=folder) == pytest.approx(report["ppl_quant"], rel=1e-4)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture) as info:
        arch_ops.architecture_for("gpt2")
    assert "llama" in str(info.value) and "gemma3_text" in str(info.value)
