"""Fused dequantize-GEMM (Triton) against an fp16 cuBLAS matmul, on LLM layer shapes.

Decode (M = 1..16 tokens) is bandwidth-bound: the packed weight is bits/16 of the fp16 bytes, so
the kernel can beat fp16 there. Prefill (M = 512, 2048) is compute-bound: the kernel pays for
dequantization inside the K loop and is expected to trail cuBLAS.

Run on a CUDA machine from the repository root:
    python3 -m pip install --no-deps --no-build-isolation -e .    # once, offline is fine
    python3 bench/gpu_dequant_gemm.py [--sweep] [--out bench/results/gpu_dequant_gemm.json]
--sweep also times a few tile configurations per case and records the best (to retune
dequant_gemm.pick_config). --smoke runs tiny shapes in the Triton interpreter on CPU to check the
script itself (times are meaningless there; nothing is written unless --out is given).

Rows (JSON list): bench, tool, tool_version, model, method, bits, group_size, M, N, K, dtype,
time_us, tflops, gbps (bytes the kernel must move: packed weight + scales/zeros + x + y),
fp16_time_us, fp16_tflops, fp16_gbps, speedup_vs_fp16, config, best_config/best_time_us (sweep),
max_rel_err (vs a float32 reference on the GPU), machine, device, torch, triton, date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N = out_features, K = in_features)
MS = (1, 2, 4, 8, 16, 512, 2048)
BITS = (2, 3, 4, 8)
GROUP = 128


def _timer(fn, cuda: bool, reps: int = 50) -> float:
    """Median seconds of fn(); CUDA: triton's do_bench (flushes L2 between reps)."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=reps, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _sweep_configs(m: int):
    from layerquant.kernels.dequant_gemm import KernelConfig

    if m <= 16:
        return [KernelConfig(16, bn, bk, sk, w, st) for bn in (32, 64, 128) for bk in (64, 128) for sk in (1, 2, 4, 8)
                for w, st in ((4, 4),)]
    return [KernelConfig(bm, bn, bk, 1, w, st) for bm, bn in ((64, 128), (128, 128), (128, 256)) for bk in (32, 64)
            for w, st in ((4, 4), (8, 3))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file for the rows (default: bench/results/gpu_dequant_gemm.json on CUDA)")
    ap.add_argument("--sweep", action="store_true", help="also time alternative tile configs and record the best")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Triton interpreter on CPU")
    ap.add_argument("--bits", type=int, nargs="*", default=list(BITS))
    ap.add_argument("--m", type=int, nargs="*", default=list(MS))
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is first defined

    import torch
    import triton

    from layerquant.kernels.dequant_gemm import pick_config, triton_dequant_matmul
    from layerquant.kernels.quant_linear import QuantLinear

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: run on a GPU machine, or pass --smoke to check the script in the interpreter", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    shapes = SHAPES if cuda else ((48, 96),)
    ms = args.m if cuda else (1, 17)
    group = GROUP if cuda else 32
    dtype = torch.float16
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu (interpreter)"
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n, k in shapes:
        groups = -(-k // group)
        w_fp16 = (torch.randn(n, k, generator=gen) * 0.02).to(dtype).to(device)
        for bits in args.bits:
            codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
            scales = (torch.rand(n, groups, generator=gen) * 0.01 + 1e-3).half().float()
            zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen, dtype=torch.uint8)
            layer = QuantLinear.from_quantized(codes, scales, zeros, bits, group, backend="triton").to(device)
            # the operands exactly as QuantLinear passes them (transposed views of [Kw, N] buffers)
            ops = (layer.qweight.t(), layer.scales.t(), layer.zeros.t())
            w_ref = layer.dequantize_weight().to(device)  # float32, for the error check
            weight_bytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.zeros))
            for m in ms:
                x = (torch.randn(m, k, generator=gen)).to(dtype).to(device)
                cfg = pick_config(m, n, k, bits, group)
                y = triton_dequant_matmul(x, *ops, bits, group, k)
                ref = x.float() @ w_ref.t()
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                t_q = _timer(lambda: triton_dequant_matmul(x, *ops, bits, group, k), cuda)
                t_fp = _timer(lambda: x @ w_fp16.t(), cuda)
                flops = 2 * m * n * k
                act_bytes = (m * k + m * n) * 2
                row = {
                    "bench": "gpu_dequant_gemm", "tool": "layerquant-triton", "tool_version": "0.1.0",
                    "model": "synthetic", "method": "dequant_gemm", "bits": bits, "group_size": group,
                    "M": m, "N": n, "K": k, "dtype": "float16",
                    "time_us": round(t_q * 1e6, 2), "tflops": round(flops / t_q / 1e12, 3),
                    "gbps": round((weight_bytes + act_bytes) / t_q / 1e9, 1),
                    "fp16_time_us": round(t_fp * 1e6, 2), "fp16_tflops": round(flops / t_fp / 1e12, 3),
                    "fp16_gbps": round((n * k * 2 + act_bytes) / t_fp / 1e9, 1),
                    "speedup_vs_fp16": round(t_fp / t_q, 3), "config": cfg.to_dict(), "max_rel_err": err,
                }
                if args.sweep and cuda:
                    best = (t_q, cfg)
                    for c in _sweep_configs(m):
                        try:
                            t_c = _timer(lambda: triton_dequant_matmul(x, *ops, bits, group, k, config=c), cuda)
                        except Exception as exc:  # a tile that does not fit shared memory: skip it
                            print(f"  skip {c}: {type(exc).__name__}", file=sys.stderr)
                            continue
                        if t_c < best[0]:
                            best = (t_c, c)
                    row["best_time_us"] = round(best[0] * 1e6, 2)
                    row["best_config"] = best[1].to_dict()
                    row["best_speedup_vs_fp16"] = round(t_fp / best[0], 3)
                row.update({"machine": f"{os.cpu_count()} cores", "device": gpu, "torch": torch.__version__,
                            "triton": triton.__version__,
                            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
                rows.append(row)
                print(f"N={n:5d} K={k:5d} w{bits} M={m:4d}: {row['time_us']:9.1f} us {row['tflops']:7.2f} TFLOP/s "
                      f"{row['gbps']:7.1f} GB/s | fp16 {row['fp16_time_us']:9.1f} us  x{row['speedup_vs_fp16']:.2f}"
                      f"{'  best x%.2f' % row['best_speedup_vs_fp16'] if 'best_speedup_vs_fp16' in row else ''}"
                      f"  err {err:.1e}", file=sys.stderr, flush=True)
                assert err < 5e-3, f"kernel disagrees with the reference: {err}"
    out = args.out or (None if args.smoke else str(Path(__file__).parent / "results" / "gpu_dequant_gemm.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
