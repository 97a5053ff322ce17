"""QuantLinear: a drop-in nn.Linear replacement that keeps its weight packed.

Storage (buffers, so they travel with .to() and the state dict):
    qweight [ceil(K*bits/32), N] int32  codes packed along the input dimension, the transpose of
                                        the compressed-tensors `weight_packed` layout (same bits,
                                        same words): neighbouring output columns are neighbours in
                                        memory, so the kernel's loads along N coalesce.
    scales  [n_groups, N] float16       (float32 if a scale is not fp16-exact)
    zeros   [n_groups, N] uint8
    bias    [N]                         optional, in the layer's dtype

Forward:
    CUDA tensors -> the fused Triton kernel (triton_dequant_matmul on transposed views).
    CPU tensors  -> torch: unpack and dequantize the weight on every call, then one float32 GEMM.
    Why per call and not a cached dense weight: a cache costs 4 bytes per weight (a 7B model
    would need 28 GB, more than this machine has) and defeats the point of the module; the
    unpack is O(N*K) against the GEMM's O(M*N*K), so it fades as M (tokens per call) grows.
    Measured on 2 cores, 4096x4096 4-bit g128: 0.12 s of dequantization per call; with M=512 the
    layer takes 0.36 s against 0.24 s for the dense float32 product, with M=1 0.145 s against
    0.004 s. For token-by-token decoding on CPU, `cache_dequantized=True` keeps the float32
    weight after the first call (dropped on .to() and load_state_dict).
"""
from __future__ import annotations

import torch
from torch import nn

from layerquant.errors import InvalidSpec
from layerquant.kernels.dequant_gemm import n_groups_of, triton_dequant_matmul
from layerquant.kernels.packing import check_bits, pack_codes, packed_length, unpack_codes

BACKENDS = ("auto", "triton", "torch")


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                 backend: str = "auto", cache_dequantized: bool = False):
        super().__init__()
        check_bits(bits)
        if backend not in BACKENDS:
            raise InvalidSpec(f"backend {backend!r} is unknown", f"use one of {', '.join(BACKENDS)}")
        if group_size < 0:
            raise InvalidSpec(f"group_size={group_size} is negative", "use 0 for per-channel or a positive group size")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.backend, self.cache_dequantized = backend, cache_dequantized
        groups = n_groups_of(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                       group_size: int, bias: torch.Tensor | None = None, **kwargs) -> "QuantLinear":
        """From the QuantizedWeight convention: codes uint8 [out, in], scales/zeros [out, n_groups]."""
        out_features, in_features = codes.shape
        groups = n_groups_of(in_features, group_size)
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (out_features, groups):
                raise InvalidSpec(f"{name} has shape {tuple(t.shape)}, expected ({out_features}, {groups})",
                                  "pass the scales/zeros of the QuantizedWeight the codes came from")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise InvalidSpec(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)", "pass the layer's own bias")
        if bias is not None and "dtype" not in kwargs and bias.dtype.is_floating_point:
            kwargs["dtype"] = bias.dtype
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, device=codes.device, **kwargs)
        layer.qweight.copy_(pack_codes(codes.t(), bits, axis=0))
        s = scales.detach().float()
        # fp16 halves the bytes and is exact for the solvers' scales; keep fp32 for anything else
        if torch.equal(s.half().float(), s):
            layer.scales = s.t().contiguous().half()
        else:
            layer.scales = s.t().contiguous()
        layer.zeros.copy_(zeros.t().to(torch.uint8))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    # -- weight views ------------------------------------------------------------------------
    def dequantize_weight(self) -> torch.Tensor:
        """float32 [out, in], equal bit for bit to QuantizedWeight.dequantize() of the codes."""
        return self._dense_kn().t()

    def _dense_kn(self) -> torch.Tensor:
        """float32 [K, N]: (code - zero) * scale computed in place, group by group (a view, no
        expanded scale/zero copies); the same fp32 operations as solvers.grid, so bit-exact."""
        k = self.in_features
        size = self.group_size or k
        w = unpack_codes(self.qweight, self.bits, k, axis=0).float()  # [K, N]
        scales, zeros = self.scales.float(), self.zeros.float()
        full = (k // size) * size
        if full:
            body = w[:full].view(k // size, size, self.out_features)
            body.sub_(zeros[: k // size, None]).mul_(scales[: k // size, None])
        if full < k:  # ragged last group
            w[full:].sub_(zeros[-1]).mul_(scales[-1])
        return w

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_triton = self.backend == "triton" or (self.backend == "auto" and x.is_cuda)
        if use_triton:
            y = triton_dequant_matmul(x, self.qweight.t(), self.scales.t(), self.zeros.t(),
                                      self.bits, self.group_size, self.in_features)
        else:
            if x.shape[-1] != self.in_features:
                raise InvalidSpec(f"input has {x.shape[-1]} features, the layer expects {self.in_features}",
                                  "pass activations whose last dimension is in_features")
            w = self._dense if self._dense is not None else self._dense_kn()
            if self.cache_dequantized:
                self._dense = w
            y = (x.float() @ w).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    # a cached dense weight must not outlive the buffers it was made from
    def _apply(self, fn, recurse=True):
        self._dense = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}")
