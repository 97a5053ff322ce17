"""Packing a weight-activation run (issue 16): compressed-tensors `pack-quantized` with each
config group's `input_activations` and the config's `kv_cache_scheme`, loaded back by
transformers + compressed-tensors and measured on the run's own evaluation windows.

The run is the solver composition a pipeline run makes (tests/support/runtime_model.py: 32
random calibration windows x 256, GPTQ 4-bit g32 with the run-time hooks active), packed by the
same format functions tasks/pack.py calls.

What transformers does with it (measured, stories260K W4 g32, 40 eval windows x 256): it
decompresses the weights and then fake-quantizes what the config says at run time, both the
linears' inputs and the KV cache. Switching its quantization off gives our W4A16 perplexity of
the same weights to 1e-7; with it on:
    W4A8KV8  ours 4.8766   transformers 4.8816 (+0.1%)   W4A16 4.8603
    W4A4     ours 6.7282   transformers 6.6444 (-1.2%)   W4A16 4.8696
    W4KV4    ours 7.2781   transformers 7.9905 (+9.8%)   W4A16 4.8425
The gaps are the grids, not the config: compressed-tensors' symmetric scale is amax / 7.5 at
4 bits (ours amax / 7), and its asymmetric range always contains 0, which coarsens the KV grid
of rows that do not straddle 0 (keys and values per head and token often do not)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from layerquant.config import RunConfig
from layerquant.errors import InvalidSpec
from layerquant.kernels.formats import ct_input_activation_args, ct_kv_cache_scheme, ct_quantization_config
from layerquant.runtime_quant import RuntimeQuant
from layerquant.serving import runtime_unservable
from layerquant.specs import QuantSpec
from support.runtime_model import open_model, plan, quantize_run_artifacts, run_perplexity, text_windows, write_packed
from support.stories_block import one_thread  # noqa: F401 - autouse fixture

pytest.importorskip("compressed_tensors")
W4 = QuantSpec(bits=4, group_size=32)


@pytest.fixture(scope="module")
def stories(stories_model, calib_text, eval_text):
    reader, tokenizer = open_model(stories_model)
    return dict(reader=reader, tokenizer=tokenizer, calib=text_windows(tokenizer, calib_text, 32, 256, "random"),
                eval=text_windows(tokenizer, eval_text, 40, 256))


def transformers_ppl(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows).logits
    return math.exp(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item())


def set_runtime_quantization(model, enabled: bool) -> int:
    """Switch compressed-tensors' run-time fake quantization (activations, KV cache) of every
    module that has a scheme; the weights stay as decompressed. Returns how many modules."""
    modules = [module for module in model.modules() if hasattr(module, "quantization_scheme")]
    for module in modules:
        module.quantization_enabled = enabled
    return len(modules)


def test_w4a8_kv8_packs_with_input_activations_and_kv_cache_scheme(stories, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    reader = stories["reader"]
    settings = RuntimeQuant(act_bits=8, kv_bits=8)
    model = plan(reader, settings)
    artifacts, blocks = quantize_run_artifacts(reader, model, stories["calib"], W4)
    ours = run_perplexity(reader, model, blocks, stories["eval"])
    w4a16 = run_perplexity(reader, plan(reader, RuntimeQuant()), blocks, stories["eval"])
    config = write_packed(reader, artifacts, tmp_path / "ct", settings)["quantization_config"]

    QuantizationConfig.model_validate(config)  # the library's own schema takes it
    groups = list(config["config_groups"].values())
    assert sum(len(group["targets"]) for group in groups) == 35  # every decoder linear of the 5 blocks
    for group in groups:
        assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                                              "strategy": "token", "group_size": None}
    head_dim = reader.config.hidden_size // reader.config.num_attention_heads
    assert config["kv_cache_scheme"] == {"num_bits": 8, "type": "int", "symmetric": False, "dynamic": True, "strategy": "group",
                                         "group_size": head_dim}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    as_loaded = transformers_ppl(loaded, stories["eval"])
    assert set_runtime_quantization(loaded, False) == 35 + 5  # the linears and the 5 attention modules (cache)
    weights_only = transformers_ppl(loaded, stories["eval"])
    # the weights are ours exactly; the activations and cache are quantized by transformers at
    # run time (it moves the perplexity as our run does), on a grid a little different from ours
    assert weights_only == pytest.approx(w4a16, rel=1e-5)
    assert as_loaded > w4a16 * 1.002, (as_loaded, w4a16, ours)
    assert as_loaded == pytest.approx(ours, rel=0.01), (as_loaded, ours)


def test_activation_groups_follow_the_layer_width():
    """act_group_size that divides a layer's input width is a dynamic group strategy; where it
    does not (stories260K's down_proj, 172 wide), the run quantized per token, and so says the
    config."""
    from compressed_tensors.quantization import QuantizationConfig

    settings = RuntimeQuant(act_bits=4, act_group_size=16)
    assert ct_input_activation_args(settings, 64)["strategy"] == "group"
    assert ct_input_activation_args(settings, 64)["group_size"] == 16
    assert ct_input_activation_args(settings, 172)["strategy"] == "token"
    assert ct_input_activation_args(RuntimeQuant(kv_bits=4), 64) is None
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}
    config = ct_quantization_config({"a.q_proj": weights, "a.down_proj": weights}, ignore=["lm_head"],
                                    input_args={"a.q_proj": ct_input_activation_args(settings, 64),
                                                "a.down_proj": ct_input_activation_args(settings, 172)},
                                    kv_cache_scheme=ct_kv_cache_scheme(RuntimeQuant(kv_bits=4, kv_group_size=4), 8))
    validated = QuantizationConfig.model_validate(config)
    assert len(validated.config_groups) == 2  # same weights, different input activations
    assert config["kv_cache_scheme"]["group_size"] == 4


def test_kv_cache_scheme_scales_per_head_and_token():
    """Why the cache is written as the group strategy: compressed-tensors applies it to keys
    [batch, heads, seq, head_dim]; a group of head_dim gives one scale per head and token (as
    FakeQuantKVCache), while its "token" strategy would give one per head and sequence."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    keys = torch.randn(2, 4, 10, 8)
    scheme = QuantizationArgs(**ct_kv_cache_scheme(RuntimeQuant(kv_bits=4), 8))
    scale, _ = compute_dynamic_scales_and_zp(keys, scheme, module=torch.nn.Module())
    assert scale.squeeze(-1).shape == (2, 4, 10)
    token = QuantizationArgs(num_bits=4, symmetric=False, strategy="token", dynamic=True)
    assert compute_dynamic_scales_and_zp(keys, token, module=torch.nn.Module())[0].squeeze().shape == (2, 4)


def test_report_states_what_vllm_cannot_run():
    w4 = {"model.layers.0.self_attn.q_proj": QuantSpec(bits=4, group_size=32)}
    w3 = {"model.layers.0.self_attn.q_proj": QuantSpec(bits=3, group_size=32)}
    assert runtime_unservable({}, w4) == []
    assert runtime_unservable(RuntimeQuant(act_bits=8).identity(), w4) == []  # W4A8 int: a vLLM scheme
    (statement,) = runtime_unservable(RuntimeQuant(act_bits=8).identity(), w3)
    assert "do not take" in statement and "q_proj" in statement
    (statement,) = runtime_unservable(RuntimeQuant(act_bits=4).identity(), w4)
    assert "4-bit int" in statement and "no kernel" in statement
    statements = runtime_unservable(RuntimeQuant(kv_bits=8, prompt_kv_tokens=64).identity(), w4)
    assert len(statements) == 2 and "fp8" in statements[0] and "first 64 tokens" in statements[1]
    assert "folded" in runtime_unservable({}, w4, lowrank_rank=4)[0]
    statements = runtime_unservable(RuntimeQuant(act_bits=4, kv_bits=4, token_clip_search=True).identity(), w4)
    assert [any("clipping search" in s for s in statements if s.startswith(part)) for part in ("activation", "KV")] == [True, True]


def test_gptq_format_refuses_runtime_quantization():
    with pytest.raises(InvalidSpec, match="GPTQ format cannot say"):
        RunConfig.from_sources(act_bits=8, pack_format="gptq")
    RunConfig.from_sources(act_bits=8, kv_bits=8, pack_format="compressed-tensors")  # what it can say


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_pipeline_packs_w4a8_kv8_as_compressed_tensors(tmp_path, stories, eval_text):
    """The flow with --act-bits 8 --kv-bits 8 and the default pack format: config.json carries
    input_activations and kv_cache_scheme, the report says what vLLM cannot run (the int8
    cache), and transformers' perplexity of the folder is the report's within the grids' 1%."""
    from layerquant.flows.quantize import quantize_flow
    from support.perplexity import transformers_perplexity

    out = tmp_path / "packed"
    config = RunConfig(store=str(tmp_path / "store"), out=str(out), bits=4, group_size=32, nsamples=32, seqlen=256,
                       act_bits=8, kv_bits=8)
    report = quantize_flow(config.model_dump())
    quant_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant_config["kv_cache_scheme"]["dynamic"] is True
    assert all(group["input_activations"]["strategy"] == "token" for group in quant_config["config_groups"].values())
    assert len(report["runtime_unservable"]) == 1 and "KV cache" in report["runtime_unservable"][0]
    assert transformers_perplexity(out, eval_text, 40) == pytest.approx(report["ppl_quant"], rel=0.01)
