"""Fused dequantize-GEMM: y = x @ dequant(W).T without materialising W, in Triton; plus references.

Operands (one convention for the reference, the Triton kernel and QuantLinear):
    x       [..., K] float16 / bfloat16 / float32
    packed  [N, ceil(K*bits/32)] int32: codes packed along the input dimension with
            `packing.pack_codes(codes, bits, axis=1)` (the compressed-tensors `weight_packed`
            layout). Any strides work: QuantLinear passes a transposed view of a [Kw, N] buffer
            so that neighbouring output columns sit next to each other in memory.
    scales  [N, n_groups] float32/float16 (fp16-exact values), zeros [N, n_groups] integer
    w[n, k] = scales[n, g(k)] * (code[n, k] - zeros[n, g(k)]),  g(k) = k // group_size
            (group_size 0 = one group per row); the last group may be ragged.
    output  [..., N] in x's dtype.

The Triton kernel is built on first use (`_kernel()`), never at import: TRITON_INTERPRET=1 must be
set before `@triton.jit` runs for the kernel to execute on CPU tensors, and importing this module
must neither import triton nor need a GPU.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from layerquant.errors import InvalidSpec, LayerquantError
from layerquant.kernels.packing import check_bits, packed_length, unpack_codes
from layerquant.quantized import dequantize_grouped

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# validation and references (pure torch)
# ----------------------------------------------------------------------------------------------
def n_groups_of(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / (group_size or in_features))


def _check_operands(x: torch.Tensor | None, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bits: int, group_size: int, in_features: int) -> None:
    check_bits(bits)
    if group_size < 0:
        raise InvalidSpec(f"group_size={group_size} is negative", "use 0 for per-channel or a positive group size")
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise InvalidSpec(f"packed must be 2-D int32, got {packed.dtype} {tuple(packed.shape)}",
                          "pack codes with layerquant.kernels.packing.pack_codes(codes, bits, axis=1)")
    n_out, n_words = packed.shape
    if n_words != packed_length(in_features, bits):
        raise InvalidSpec(f"packed has {n_words} words per row, {in_features} inputs at {bits} bits need "
                          f"{packed_length(in_features, bits)}", "pass the in_features and bits the codes were packed with")
    groups = n_groups_of(in_features, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n_out, groups):
            raise InvalidSpec(f"{name} has shape {tuple(t.shape)}, expected ({n_out}, {groups})",
                              f"one value per output row and group of {group_size or in_features} inputs")
    if zeros.dtype.is_floating_point:
        raise InvalidSpec(f"zeros must be integers, got {zeros.dtype}", "pass the uint8 zeros of a QuantizedWeight")
    if x is not None:
        if x.dtype not in FLOAT_DTYPES:
            raise InvalidSpec(f"x has dtype {x.dtype}", "use float16, bfloat16 or float32 activations")
        if x.shape[-1] != in_features:
            raise InvalidSpec(f"x has {x.shape[-1]} features, the weight expects {in_features}",
                              "pass activations whose last dimension is the layer's in_features")


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int, in_features: int) -> torch.Tensor:
    """float32 [N, K] weight; bit for bit equal to QuantizedWeight.dequantize() of the same codes."""
    _check_operands(None, packed, scales, zeros, bits, group_size, in_features)
    codes = unpack_codes(packed, bits, in_features, axis=1)
    return dequantize_grouped(codes, scales.float(), zeros, group_size)


def reference_dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                             bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Torch reference: float32 weight, float32 product, cast to x's dtype."""
    _check_operands(x, packed, scales, zeros, bits, group_size, in_features)
    w = dequantize_packed(packed, scales, zeros, bits, group_size, in_features).to(x.device)
    return (x.float() @ w.t()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters. block_* are powers of two >= 16 (tl.dot's minimum)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1  # >1: each program sums a slice of K; partial sums are added in torch
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return dict(block_m=self.block_m, block_n=self.block_n, block_k=self.block_k, split_k=self.split_k,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _largest_block_k(group_size: int, in_features: int, cap: int) -> int:
    """Largest power-of-two BLOCK_K <= cap that keeps every K tile inside one group (so the
    kernel loads one scale/zero row per tile); falls back to `cap` (per-element gather) if none."""
    if group_size == 0 or group_size >= in_features:
        return cap
    b = cap
    while b >= 16:
        if group_size % b == 0:
            return b
        b //= 2
    return cap


def pick_config(m: int, n: int, k: int, bits: int, group_size: int, device_sms: int = 132) -> KernelConfig:
    """Heuristic tiles. Decode (small M) is bandwidth-bound: small BLOCK_M, and split-K so that
    enough programs stream the weight to fill the GPU. Prefill is compute-bound: large tiles."""
    if interpreting():
        # the interpreter runs every program in Python: few, small programs are fastest
        return KernelConfig(block_m=16, block_n=32, block_k=_largest_block_k(group_size, k, 32), split_k=1)
    if m <= 16:
        block_m, block_n, cap, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        block_m, block_n, cap, warps, stages = 64, 64, 64, 4, 4
    else:
        block_m, block_n, cap, warps, stages = 128, 128, 64, 8, 3
    block_k = _largest_block_k(group_size, k, cap)
    tiles = math.ceil(m / block_m) * math.ceil(n / block_n)
    split_k = 1
    k_tiles = math.ceil(k / block_k)
    # aim for ~2 waves of programs, keep >= 4 K tiles per program so each still streams
    while tiles * split_k < 2 * device_sms and k_tiles // (split_k * 2) >= 4:
        split_k *= 2
    return KernelConfig(block_m, block_n, block_k, split_k, warps, stages)


@functools.cache
def _kernel():
    """Define the @triton.jit kernel (once per process; cached so Triton's own compile cache is
    keyed on one function object). Lazy on purpose: see the module docstring."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_gemm_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
        M, N, K, group_size, k_per_split,
        stride_xm, stride_xk,
        stride_wn, stride_wk,
        stride_sn, stride_sg,
        stride_zn, stride_zg,
        stride_os, stride_om, stride_on,
        BITS: tl.constexpr,
        GROUP_ALIGNED: tl.constexpr,
        FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            # dense bitstream: code k starts at bit k*BITS of its row
            bitpos = offs_k * BITS
            word = bitpos // 32
            shift = (bitpos % 32).to(tl.uint32)
            tile_mask = mask_k[:, None] & mask_n[None, :]
            w_ptrs = w_ptr + offs_n[None, :] * stride_wn + word[:, None] * stride_wk
            # unsigned view: a logical right shift leaves no sign bits to mask off
            w0 = tl.load(w_ptrs, mask=tile_mask, other=0).to(tl.uint32, bitcast=True)
            q = w0 >> shift[:, None]
            if (32 % BITS) != 0:
                # 3 bits: codes 10 and 21 of each 32 straddle two words; fetch the next word there
                spill = (shift + BITS) > 32
                w1 = tl.load(w_ptrs + stride_wk, mask=tile_mask & spill[:, None], other=0).to(tl.uint32, bitcast=True)
                up = tl.where(spill, 32 - shift, 0).to(tl.uint32)
                q = q | tl.where(spill[:, None], w1 << up[:, None], 0)
            q = (q & ((1 << BITS) - 1)).to(tl.float32)
            if GROUP_ALIGNED:
                # the whole K tile lies in one group: one scale/zero per output column
                g = k0 // group_size
                s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
                w = (q - z[None, :]) * s[None, :]
            else:
                g = offs_k // group_size
                s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g[:, None] * stride_sg, mask=tile_mask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + offs_n[None, :] * stride_zn + g[:, None] * stride_zg, mask=tile_mask, other=0).to(tl.float32)
                w = (q - z) * s
            if FP32_DOT:
                acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(a, w.to(a.dtype))
        out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    return triton, dequant_gemm_kernel


def triton_dequant_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          bits: int, group_size: int, in_features: int, *,
                          config: KernelConfig | None = None) -> torch.Tensor:
    """x @ dequant(W).T with dequantization fused into the GEMM's K loop (operands: module doc).

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this function
    was first called. float32 inputs use an IEEE fp32 dot; fp16/bf16 inputs dequantize each tile
    to x's dtype and accumulate in fp32.
    """
    _check_operands(x, packed, scales, zeros, bits, group_size, in_features)
    if x.device.type != "cuda" and not interpreting():
        raise LayerquantError(
            f"the Triton kernel needs CUDA tensors, got {x.device.type}",
            "move the layer to a GPU, use reference_dequant_matmul / QuantLinear's torch path on CPU, "
            "or set TRITON_INTERPRET=1 before the first call to run it in the (slow) interpreter",
        )
    for t in (packed, scales, zeros):
        if t.device != x.device:
            raise InvalidSpec(f"operands are on {t.device} and {x.device}", "move the layer and its input to one device")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m, k = x2.shape
    n = packed.shape[0]
    if m == 0 or n == 0:
        return torch.zeros(*lead, n, dtype=x.dtype, device=x.device)
    if config is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 132
        config = pick_config(m, n, k, bits, group_size, sms)
    cfg = config
    eff_group = group_size if 0 < group_size < k else k
    aligned = eff_group % cfg.block_k == 0 or eff_group >= k
    k_tiles = math.ceil(k / cfg.block_k)
    split_k = max(1, min(cfg.split_k, k_tiles))
    k_per_split = math.ceil(k_tiles / split_k) * cfg.block_k
    split_k = math.ceil(k / k_per_split)
    if split_k == 1:
        out = torch.empty(1, m, n, dtype=x.dtype, device=x.device)
    else:
        # partial sums stay fp32 and are added here: deterministic, unlike atomics
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    # The interpreter keeps bf16 as raw uint16 bits and its tl.dot multiplies those bit patterns
    # (triton-lang/triton#11584, unsupported upstream); dot bf16 tiles in fp32 there. On a GPU
    # bf16 tiles go to the tensor cores as they are.
    fp32_dot = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
    triton, kernel = _kernel()
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    extra = {} if interpreting() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kernel[grid](
        x2, packed, scales, zeros, out,
        m, n, k, eff_group, k_per_split,
        x2.stride(0), x2.stride(1),
        packed.stride(0), packed.stride(1),
        scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BITS=bits, GROUP_ALIGNED=aligned, FP32_DOT=fp32_dot,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        **extra,
    )
    y = out[0] if split_k == 1 else out.sum(dim=0).to(x.dtype)
    return y.reshape(*lead, n)
