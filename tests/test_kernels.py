"""Fused dequantize-GEMM: the torch reference is exact, the Triton kernel (run on CPU through
TRITON_INTERPRET=1 in a subprocess, since the variable must be set before the kernel is defined)
matches it on odd shapes and ragged groups, and QuantLinear's CPU path is exact and sound."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerquant.errors import LayerquantError
from layerquant.kernels.dequant_gemm import (
    dequantize_packed,
    interpreting,
    reference_dequant_matmul,
    triton_dequant_matmul,
)
from layerquant.kernels.packing import pack_codes
from layerquant.kernels.quant_linear import QuantLinear
from layerquant.solvers.grid import rtn_quantize
from layerquant.specs import QuantSpec

BITS = (2, 3, 4, 8)
GROUPS = (32, 24, 0)  # 172 inputs: ragged for 32 and 24 (tails 12 and 4), per-channel


@pytest.fixture(scope="module")
def real_weights(stories_model):
    """Real trained projections of the bundled stories260K Llama (64 x 172 and 172 x 64)."""
    sd = load_file(str(Path(stories_model) / "model.safetensors"))
    return {"down": sd["model.layers.2.mlp.down_proj.weight"], "gate": sd["model.layers.2.mlp.gate_proj.weight"],
            "q": sd["model.layers.2.self_attn.q_proj.weight"]}


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("sym", (True, False))
def test_reference_is_the_exact_dense_product(real_weights, bits, group_size, sym):
    w = real_weights["down"]
    qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=group_size, sym=sym, method="rtn"))
    packed = pack_codes(qw.codes, bits, axis=1)
    dense = qw.dequantize()
    assert torch.equal(dequantize_packed(packed, qw.scales, qw.zeros, bits, group_size, w.shape[1]), dense)
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(bits))
    y = reference_dequant_matmul(x, packed, qw.scales, qw.zeros, bits, group_size, w.shape[1])
    assert torch.equal(y, x @ dense.t())
    y16 = reference_dequant_matmul(x.half(), packed, qw.scales.half(), qw.zeros, bits, group_size, w.shape[1])
    assert y16.dtype == torch.float16 and torch.equal(y16, (x.half().float() @ dense.t()).half())


@pytest.mark.parametrize("bits", BITS)
def test_quant_linear_cpu_path(real_weights, bits):
    w = real_weights["gate"]  # [172, 64]
    bias = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, w.shape[1], generator=torch.Generator().manual_seed(2))
    fp = x @ w.t() + bias
    sqnrs = []
    for group_size, sym in ((16, True), (24, False), (0, True)):
        qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=group_size, sym=sym, method="rtn"))
        layer = QuantLinear.from_quantized(qw.codes, qw.scales, qw.zeros, bits, group_size, bias=bias)
        assert torch.equal(layer.dequantize_weight(), qw.dequantize())
        y = layer(x)
        dense = x @ qw.dequantize().t() + bias
        assert y.shape == (2, 3, w.shape[0]) and y.dtype == x.dtype
        torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-5)
        sqnrs.append(_sqnr_db(fp, y))
        # the packed layer is what it claims: bits/8 bytes a weight plus group parameters
        assert layer.qweight.numel() * 4 * 8 == pytest.approx(bits * w.numel(), rel=0.05)
        # state dict round trip into a fresh module
        fresh = QuantLinear(w.shape[1], w.shape[0], bits, group_size, bias=True, dtype=torch.float32)
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(fresh(x), y)
        # opt-in cache gives the same numbers and is dropped when buffers move
        layer.cache_dequantized = True
        assert torch.equal(layer(x), y) and layer._dense is not None
        layer.to(torch.device("cpu"))
        assert layer._dense is None
    # quality: output SQNR against the float layer grows ~6 dB per bit (checked loosely)
    floor = {2: 3.0, 3: 10.0, 4: 16.0, 8: 38.0}[bits]
    assert min(sqnrs) > floor, sqnrs


def test_triton_on_cpu_without_interpreter_raises():
    if interpreting():
        pytest.skip("TRITON_INTERPRET is set for this whole process")
    qw = rtn_quantize(torch.randn(16, 32), QuantSpec(bits=4, group_size=16, method="rtn"))
    with pytest.raises(LayerquantError, match="CUDA"):
        triton_dequant_matmul(torch.randn(2, 32), pack_codes(qw.codes, 4), qw.scales, qw.zeros, 4, 16, 32)


# Runs in a fresh interpreter with TRITON_INTERPRET=1; prints one JSON list of results.
_TRITON_SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys, time
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from safetensors.torch import load_file
    from layerquant.kernels.dequant_gemm import KernelConfig, reference_dequant_matmul, triton_dequant_matmul
    from layerquant.kernels.packing import pack_codes
    from layerquant.kernels.quant_linear import QuantLinear
    from layerquant.solvers.grid import rtn_quantize
    from layerquant.specs import QuantSpec

    torch.manual_seed(0)
    rows, t0 = [], time.time()
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def run(tag, x, packed, scales, zeros, bits, g, k, config=None):
        y = triton_dequant_matmul(x, packed, scales, zeros, bits, g, k, config=config)
        r = reference_dequant_matmul(x, packed, scales, zeros, bits, g, k)
        err = ((y.float() - r.float()).abs().max() / r.float().abs().max()).item()
        rows.append(dict(tag=tag, bits=bits, group=g, k=k, m=x.shape[0], dtype=str(x.dtype).split(".")[-1],
                         shape_ok=tuple(y.shape) == tuple(r.shape) and y.dtype == x.dtype, err=err))

    # random codes/zeros on odd shapes: K=72 (G=32 ragged tail 8, tiles inside one group),
    # K=100 (G=24: tiles straddle groups -> per-element gather), per-channel, exact G=16
    i = 0
    for bits in (2, 3, 4, 8):
        for k, g in ((72, 32), (100, 24), (100, 0), (64, 16)):
            n, ng = 24, -(-k // (g or k))
            codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
            scales = (torch.rand(n, ng) * 0.05 + 0.005).half().float()
            zeros = torch.randint(0, 2 ** bits, (n, ng), dtype=torch.uint8)
            packed = pack_codes(codes, bits)
            for m in (1, 3, 17):
                x = torch.randn(m, k).to(dtypes[i % 3]); i += 1
                run("random", x, packed, scales, zeros, bits, g, k)
            # split-K with partial sums, small tiles
            run("splitk", torch.randn(5, k), packed, scales, zeros, bits, g, k, KernelConfig(16, 16, 16, split_k=3))
            # transposed (QuantLinear-style) operand views
            run("strided", torch.randn(3, k).half(), pack_codes(codes.t(), bits, axis=0).t(),
                scales.t().contiguous().t(), zeros.t().contiguous().t(), bits, g, k)

    # real trained weights: stories260K down_proj [64, 172], rtn at every width, G=32 (ragged)
    sd = load_file(sys.argv[1])
    w = sd["model.layers.2.mlp.down_proj.weight"]
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            qw = rtn_quantize(w, QuantSpec(bits=bits, group_size=32, sym=sym, method="rtn"))
            x = torch.randn(5, w.shape[1])
            run("real", x, pack_codes(qw.codes, bits), qw.scales, qw.zeros, bits, 32, w.shape[1])
            layer = QuantLinear.from_quantized(qw.codes, qw.scales, qw.zeros, bits, 32, backend="triton")
            yt = layer(x.half())
            layer.backend = "torch"
            yc = layer(x.half())
            rows.append(dict(tag="quantlinear", bits=bits, group=32, k=w.shape[1], m=5, dtype="float16",
                             shape_ok=yt.shape == yc.shape,
                             err=((yt.float() - yc.float()).abs().max() / yc.float().abs().max()).item()))
    print(json.dumps(dict(rows=rows, seconds=time.time() - t0)))
    """
)

# output rounding: fp16 kernels also round each dequantized weight to fp16; bf16 runs through the
# interpreter, whose fp32->bf16 cast truncates (up to 1 ulp = 2**-7 relative, plus the reference's
# own rounding)
TOL = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1.6e-2}


def test_triton_kernel_matches_reference_in_interpreter(stories_model, tmp_path):
    script = tmp_path / "run_triton.py"
    script.write_text(_TRITON_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(script), str(Path(stories_model) / "model.safetensors")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert len(rows) == 4 * 4 * 5 + 4 * 2 * 2
    bad = [r for r in rows if not r["shape_ok"] or r["err"] > TOL[r["dtype"]]]
    assert not bad, bad
    # every combination really ran: all widths, ragged/unaligned/per-channel groups, all dtypes
    assert {r["bits"] for r in rows} == set(BITS)
    assert {r["dtype"] for r in rows} == set(TOL)
    assert {r["group"] for r in rows} >= {32, 24, 0, 16}
