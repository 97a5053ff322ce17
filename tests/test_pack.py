"""Packed checkpoints: transformers (through compressed-tensors) loads ours with the perplexity
we measured on the dequantized model; the GPTQ format holds what GPTQ loaders expect."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from layerquant.config import RunConfig
from layerquant.flows.quantize import quantize_flow
from layerquant.flows.retry import pack_flow
from support.perplexity import transformers_perplexity

# whole quantization runs on stories260K: minutes each, so not in the fast tier
pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]
pytest.importorskip("compressed_tensors")

SETTINGS = dict(nsamples=32, seqlen=256, eval_windows=20, eval_seqlen=256, group_size=32)


def test_mixed_precision_compressed_tensors_checkpoint_loads_with_our_perplexity(tmp_path, eval_text):
    overrides = {"model.layers.0.mlp.down_proj": {"bits": 8}, "model.layers.4.self_attn.o_proj": {"bits": 3, "group_size": 0}}
    out = tmp_path / "packed"
    config = RunConfig(store=str(tmp_path / "store"), out=str(out), pack_format="compressed-tensors", bits=4,
                       overrides=overrides, **SETTINGS)
    report = quantize_flow(config.model_dump())
    quant_config = json.loads((out / "config.json").read_text())["quantization_config"]
    # 4-bit g32, 8-bit, 3-bit per-channel, and 4-bit down_proj whose ragged 172 = 5x32 + 12 columns
    # compressed-tensors cannot express: written with group gcd(32, 12) = 4, scales repeated
    assert quant_config["format"] == "pack-quantized" and len(quant_config["config_groups"]) == 4
    with safe_open(out / "model-00001-of-00006.safetensors", "pt") as handle:
        assert "model.layers.0.mlp.down_proj.weight_packed" in handle.keys()
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight_packed").dtype == torch.int32
    assert report["vllm_unservable"] == ["model.layers.4.self_attn.o_proj"]
    # transformers + compressed-tensors decompress it into the model we evaluated
    assert transformers_perplexity(out, eval_text, 20) == pytest.approx(report["ppl_quant"], rel=1e-5)


def test_gptq_format_from_a_finished_run(tmp_path, tiny_model_dir):
    # GPTQ packs output features into int32 words too: the tiny Llama's 64/96 widths fit,
    # stories260K's 172 do not (that model exports as compressed-tensors)
    config = RunConfig(model=str(tiny_model_dir("llama")), store=str(tmp_path / "store"), bits=4,
                       **{**SETTINGS, "seqlen": 64, "eval_seqlen": 64, "eval_windows": 4})
    report = quantize_flow(config.model_dump())
    out = tmp_path / "gptq"
    pack_flow(report["run_id"], str(tmp_path / "store"), "gptq", str(out))
    quantize_config = json.loads((out / "quantize_config.json").read_text())
    assert quantize_config["bits"] == 4 and quantize_config["group_size"] == 32
    with safe_open(out / "model-00002-of-00003.safetensors", "pt") as handle:
        qweight = handle.get_tensor("model.layers.1.mlp.up_proj.qweight")
        assert qweight.dtype == torch.int32 and qweight.shape == (64 * 4 // 32, 96)
        assert handle.get_tensor("model.layers.1.mlp.up_proj.qzeros").shape == (2, 96 * 4 // 32)
        assert handle.get_tensor("model.layers.1.mlp.up_proj.scales").dtype == torch.float16
        assert handle.get_tensor("model.layers.1.mlp.up_proj.g_idx").tolist() == [c // 32 for c in range(64)]
