"""The quantized-weight type every layer passes around: integer codes plus group parameters.

Core rather than solvers because both the solvers (which fit it) and the kernels (which pack and
multiply it) need it, and neither may import the other. One convention (see `QuantSpec`):
w_hat = scale * (q - zero), q in [0, 2**bits - 1], groups along input columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from layerquant.specs import QuantSpec


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def expand_groups(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[out, n_groups] -> [out, in] by repeating each group's value over its columns."""
    size = group_size or in_features
    return per_group.repeat_interleave(size, dim=1)[:, :in_features]


def dequantize_grouped(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    in_features = codes.shape[1]
    scale = expand_groups(scales.float(), in_features, group_size)
    zero = expand_groups(zeros.float(), in_features, group_size)
    return dequantize_codes(codes.float(), scale, zero)


@dataclass
class QuantizedWeight:
    """Integer codes plus group parameters of one matrix; exactly dequantizable.

    codes: uint8 [out, in]; scales: float32 [out, n_groups] (fp16-exact); zeros: uint8 [out, n_groups].
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_grouped(self.codes, self.scales, self.zeros, self.spec.group_size).to(dtype)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales, "zeros": self.zeros}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> "QuantizedWeight":
        return cls(codes=tensors["codes"], scales=tensors["scales"], zeros=tensors["zeros"], spec=spec)
