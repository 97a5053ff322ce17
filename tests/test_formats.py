"""Checkpoint formats: our tensors decode to the solvers' weights bit for bit, compressed-tensors
itself (and transformers through it) decompresses them to the same weights, and GPTQ tensors
decode the same way under an unpacking written here from the format's description."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerquant.errors import InvalidSpec
from layerquant.kernels.formats import (
    ct_export_group_size,
    ct_layer_tensors,
    ct_quantization_config,
    gptq_layer_tensors,
    gptq_quantization_config,
)
from layerquant.kernels.packing import unpack_codes
from layerquant.solvers.grid import dequantize_grouped, rtn_quantize
from layerquant.specs import QuantSpec

BITS = (2, 3, 4, 8)
# on in_features 64 and 172: exact groups, ragged groups (64 % 24, 172 % 32, 172 % 24), per-channel,
# and a group as wide as the row
GROUPS = (16, 24, 32, 0, 256)


@pytest.fixture(scope="module")
def stories_sd(stories_model):
    return load_file(str(Path(stories_model) / "model.safetensors"))


@pytest.fixture(scope="module")
def real_layers(stories_sd):
    return {"q": stories_sd["model.layers.1.self_attn.q_proj.weight"],      # [64, 64]
            "down": stories_sd["model.layers.1.mlp.down_proj.weight"],  # [64, 172]
            "k": stories_sd["model.layers.1.self_attn.k_proj.weight"]}      # [32, 64]


def _combos():
    for bits in BITS:
        for g in GROUPS:
            for sym in (True, False):
                yield bits, g, sym


# ------------------------------------------------------------------------------------------
# (i) our own decoding of compressed-tensors tensors is the solvers' dequantize, bit for bit
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ("q", "down"))
def test_ct_tensors_decode_bit_exact(real_layers, layer):
    w = real_layers[layer]
    out_f, in_f = w.shape
    for bits, g, sym in _combos():
        qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=g, sym=sym, method="rtn"))
        tensors, args = ct_layer_tensors("m.proj", qw, torch.float16)
        eg = ct_export_group_size(in_f, g)
        assert args["strategy"] == ("group" if eg else "channel") and args["group_size"] == (eg or None)
        codes = unpack_codes(tensors["m.proj.weight_packed"], bits, in_f, axis=1)
        assert torch.equal(codes, qw.codes)
        assert tensors["m.proj.weight_shape"].tolist() == [out_f, in_f]
        scales = tensors["m.proj.weight_scale"]
        assert scales.dtype == torch.float16 and scales.shape == (out_f, math.ceil(in_f / (eg or in_f)))
        if sym:
            assert "m.proj.weight_zero_point" not in tensors
            zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8)
        else:
            zeros = unpack_codes(tensors["m.proj.weight_zero_point"], bits, out_f, axis=0)
        back = dequantize_grouped(codes, scales.float(), zeros, eg)
        assert torch.equal(back, qw.dequantize()), (bits, g, sym)


# ------------------------------------------------------------------------------------------
# (ii) compressed-tensors itself
# ------------------------------------------------------------------------------------------
def _ct():
    return pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (dev extra)")


@pytest.mark.parametrize("layer", ("q", "down"))
@pytest.mark.parametrize("scale_dtype", (torch.float16, torch.float32, torch.bfloat16))
def test_compressed_tensors_decompresses_our_tensors(real_layers, layer, scale_dtype):
    _ct()
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    w = real_layers[layer]
    args_by_layer = {}
    for bits, g, sym in _combos():
        qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=g, sym=sym, method="rtn"))
        name = f"model.b{bits}g{g}{'s' if sym else 'a'}"
        tensors, args = ct_layer_tensors(name, qw, scale_dtype)
        args_by_layer[name] = args
        config = QuantizationConfig.model_validate(ct_quantization_config({name: args}))
        scheme = next(iter(config.config_groups.values()))
        local = {k.removeprefix(name + "."): v for k, v in tensors.items()}
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        # the library computes (q - z) * scale in the scale dtype; the product of an exact scale
        # and a small integer is exact in fp32, so ours rounded once to that dtype must match
        expect = dequantize_grouped(qw.codes, qw.scales.to(scale_dtype).float(), qw.zeros, g).to(scale_dtype)
        assert weight.dtype == scale_dtype
        assert torch.equal(weight, expect), (bits, g, sym)
        if scale_dtype == torch.float32:  # no output rounding at all: the solvers' weights exactly
            assert torch.equal(weight, qw.dequantize())
    # one config for all of them validates and keeps one group per distinct scheme
    config = QuantizationConfig.model_validate(ct_quantization_config(args_by_layer, ignore=["lm_head"]))
    assert len(config.config_groups) == len({json.dumps(a, sort_keys=True) for a in args_by_layer.values()})
    assert config.format == "pack-quantized" and config.ignore == ["lm_head"]


def _export_ct_model(stories_model, stories_sd, plan, folder: Path) -> dict:
    """Write stories260K with every linear layer replaced by our pack-quantized tensors; return
    {layer: dequantized weight} for the reference model."""
    config = json.loads((Path(stories_model) / "config.json").read_text())
    state, args, dense = {}, {}, {}
    for key, value in stories_sd.items():
        module, _, leaf = key.rpartition(".")
        kind = module.rsplit(".", 1)[-1]
        if kind in plan and leaf == "weight":
            qw = rtn_quantize(value, plan[kind])
            tensors, a = ct_layer_tensors(module, qw, torch.float32)
            state.update(tensors)
            args[module] = a
            dense[module] = qw.dequantize()
        else:
            state[key] = value.contiguous()
    config["quantization_config"] = ct_quantization_config(args, ignore=["lm_head"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return dense


def _reference_model(stories_model, dense):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_model, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w in dense.items():
            model.get_submodule(name).weight.copy_(w)
    return model


def _ppl(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


# a mixed-precision symmetric plan: every width, a ragged group on down_proj (172 % 32 = 12, written
# as group 4), per-channel, and a group wider than the row (written as channel)
SYM_PLAN = {"q_proj": QuantSpec(4, 32, True, "rtn"), "k_proj": QuantSpec(3, 16, True, "rtn"),
            "v_proj": QuantSpec(8, 0, True, "rtn"), "o_proj": QuantSpec(4, 128, True, "rtn"),
            "gate_proj": QuantSpec(4, 24, True, "rtn"), "up_proj": QuantSpec(8, 32, True, "rtn"),
            "down_proj": QuantSpec(3, 32, True, "rtn")}


def test_transformers_loads_our_pack_quantized_model(stories_model, stories_sd, eval_text, tmp_path):
    _ct()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "ct"
    dense = _export_ct_model(stories_model, stories_sd, SYM_PLAN, folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = _reference_model(stories_model, dense)
    tok = AutoTokenizer.from_pretrained(stories_model)
    text = Path(eval_text).read_text(encoding="utf-8")[:3000]  # the fixture is the bundled file's path
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
    assert torch.equal(got, want)
    for name, w in dense.items():  # decompressed in place on the first forward
        assert torch.equal(loaded.get_submodule(name).weight, w), name
    # and it is a working language model: 3-8 bit RTN stays near the float model on real text
    fp = AutoModelForCausalLM.from_pretrained(stories_model, dtype=torch.float32).eval()
    ppl_fp, ppl_q = _ppl(fp, ids), _ppl(loaded, ids)
    assert ppl_fp < ppl_q < 1.5 * ppl_fp, (ppl_fp, ppl_q)


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="transformers 5.23 + compressed-tensors 0.20.0 allocate the asymmetric zero point "
                          "unpacked ([out, groups]) while compressing on meta, but the checkpoint holds it "
                          "packed as compressed-tensors' own compress() writes it: load fails on the shape")
def test_transformers_loads_asymmetric_pack_quantized(stories_model, stories_sd, tmp_path):
    _ct()
    from transformers import AutoModelForCausalLM

    plan = {k: QuantSpec(4, 32, False, "rtn") for k in SYM_PLAN}
    dense = _export_ct_model(stories_model, stories_sd, plan, tmp_path / "asym")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "asym", dtype=torch.float32).eval()
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, _reference_model(stories_model, dense)(ids).logits)


def test_ct_config_shape(real_layers):
    qw4 = rtn_quantize(real_layers["q"], QuantSpec(4, 32, True, "rtn"))
    qw3 = rtn_quantize(real_layers["down"], QuantSpec(3, 32, False, "rtn"))
    _, a4 = ct_layer_tensors("model.layers.0.self_attn.q_proj", qw4)
    _, a4b = ct_layer_tensors("model.layers.1.self_attn.q_proj", qw4)
    _, a3 = ct_layer_tensors("model.layers.0.mlp.down_proj", qw3)
    cfg = ct_quantization_config({"model.layers.0.self_attn.q_proj": a4, "model.layers.1.self_attn.q_proj": a4b,
                                  "model.layers.0.mlp.down_proj": a3}, ignore=["lm_head"])
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    groups = list(cfg["config_groups"].values())
    assert [g["weights"]["num_bits"] for g in groups] == [3, 4]
    assert groups[0]["targets"] == [r"re:^model\.layers\.0\.mlp\.down_proj$"]
    assert groups[0]["weights"] == {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group",
                                    "group_size": 4, "dynamic": False}  # 172 % 32 = 12 -> gcd 4
    assert len(groups[1]["targets"]) == 2
    with pytest.raises(InvalidSpec, match="both quantized and ignored"):
        ct_quantization_config({"lm_head": a4}, ignore=["lm_head"])
    pb = rtn_quantize(real_layers["q"], QuantSpec(4, 32, True, "rtn"))
    pb.spec = QuantSpec(method="pbllm", salient_fraction=0.1)
    with pytest.raises(InvalidSpec, match="PB-LLM"):
        ct_layer_tensors("x", pb)


# ------------------------------------------------------------------------------------------
# (iii) GPTQ: an unpacking written from the format's description, not from packing.py
# ------------------------------------------------------------------------------------------
def _gptq_reference_dequant(t: dict, bits: int, in_f: int, out_f: int, v1: bool) -> torch.Tensor:
    """AutoGPTQ/GPTQModel description: qweight[i // (32/b), o] holds input row i at bit b*(i % (32/b));
    qzeros[g, o // (32/b)] holds output o's zero at bit b*(o % (32/b)), stored minus one in v1;
    w[o, i] = scales[g_idx[i], o] * (q - zero)."""
    per, mask = 32 // bits, (1 << bits) - 1
    qweight = t["qweight"].to(torch.int64) & 0xFFFFFFFF  # words as unsigned
    qzeros = t["qzeros"].to(torch.int64) & 0xFFFFFFFF
    i = torch.arange(in_f)
    o = torch.arange(out_f)
    q = (qweight[i // per, :] >> (bits * (i % per))[:, None]) & mask  # [in, out]
    g = t["g_idx"].to(torch.int64)
    z = (qzeros[g][:, o // per] >> (bits * (o % per))[None, :]) & mask  # [in, out]
    if v1:
        z = z + 1
    s = t["scales"].float()[g]  # [in, out]
    return (s * (q - z).float()).t()


@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("fmt", ("gptq", "gptq_v2"))
def test_gptq_tensors_decode_by_the_format_description(real_layers, bits, fmt):
    for layer in ("q", "k"):
        w = real_layers[layer]
        out_f, in_f = w.shape
        for g in (16, 24, 32, 0):
            for sym in (True, False):
                qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=g, sym=sym, method="rtn"))
                if fmt == "gptq" and bool((qw.zeros == 0).any()):
                    with pytest.raises(InvalidSpec, match="zero point of 0"):
                        gptq_layer_tensors("l", qw, fmt)
                    continue
                t = {k.removeprefix("l."): v for k, v in gptq_layer_tensors("l", qw, fmt).items()}
                groups = math.ceil(in_f / (g or in_f))
                assert t["qweight"].shape == (in_f * bits // 32, out_f) and t["qweight"].dtype == torch.int32
                assert t["qzeros"].shape == (groups, out_f * bits // 32) and t["qzeros"].dtype == torch.int32
                assert t["scales"].shape == (groups, out_f) and t["scales"].dtype == torch.float16
                assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (in_f,)
                back = _gptq_reference_dequant(t, bits, in_f, out_f, v1=fmt == "gptq")
                assert torch.equal(back, qw.dequantize()), (layer, g, sym)


def test_gptq_limits_and_config(real_layers):
    qw = rtn_quantize(real_layers["q"], QuantSpec(3, 32, True, "rtn"))
    with pytest.raises(InvalidSpec, match="compressed-tensors"):
        gptq_layer_tensors("l", qw)
    qw = rtn_quantize(real_layers["down"].t().contiguous()[:, :60], QuantSpec(4, 32, True, "rtn"))  # in=60
    with pytest.raises(InvalidSpec, match="divisible by 8"):
        gptq_layer_tensors("l", qw)
    # asymmetric zero point 0 (an all-positive group) is refused by v1 and exact in v2
    w = real_layers["k"].clone()
    w[:, :32] = w[:, :32].abs() + 0.01
    qw = rtn_quantize(w, QuantSpec(4, 32, False, "rtn"))
    assert bool((qw.zeros == 0).any())
    with pytest.raises(InvalidSpec, match="gptq_v2"):
        gptq_layer_tensors("l", qw, "gptq")
    t = {k[2:]: v for k, v in gptq_layer_tensors("l", qw, "gptq_v2").items()}
    assert torch.equal(_gptq_reference_dequant(t, 4, 64, 32, v1=False), qw.dequantize())

    spec = QuantSpec(4, 128, True, "gptq")
    cfg = gptq_quantization_config([spec, spec])
    assert cfg["bits"] == 4 and cfg["group_size"] == 128 and cfg["sym"] and not cfg["desc_act"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert gptq_quantization_config([QuantSpec(8, 0, False, "rtn")], "gptq_v2")["group_size"] == -1
    from transformers import GPTQConfig

    parsed = GPTQConfig.from_dict(cfg)
    assert parsed.bits == 4 and parsed.group_size == 128 and parsed.sym and parsed.format == "gptq"
    with pytest.raises(InvalidSpec, match="one bits/group_size/sym"):
        gptq_quantization_config([spec, QuantSpec(4, 64, True, "gptq")])
    with pytest.raises(InvalidSpec, match="not written in GPTQ"):
        gptq_quantization_config([QuantSpec(2, 128, True, "gptq")])
