"""Bit packing of integer codes into int32 words: one dense layout for 2, 3, 4 and 8 bits.

Layout (the "dense little-endian bitstream"):
    Along the packed axis, value i occupies bits [i*bits, (i+1)*bits) of a bitstream whose bit b
    is bit (b % 32) of word (b // 32); the least significant bit comes first. A line of n values
    takes ceil(n*bits/32) words, the tail of the last word is zero.

Why this one layout serves every client we write for:
    - bits in {2, 4, 8}: a word holds 32/bits whole values, value j of a word in bits
      [j*bits, (j+1)*bits). This is the classic GPTQ (AutoGPTQ/GPTQModel) order and the
      compressed-tensors `pack-quantized` order.
    - bits = 3: 32 values fill exactly 3 words and a value may straddle two words (values 10 and
      21 of each 32-value block do). This is GPTQ's 3-bit layout (32 values in 3 int32 words) and
      the dense packing compressed-tensors uses for 3 bits since its dense-packing change (the
      releases before it padded 10 values per word; 0.20.0 is dense, see formats.py).
    - axis=1 packs along columns ([rows, cols] -> [rows, ceil(cols*bits/32)]: compressed-tensors
      `weight_packed` of a [out, in] weight); axis=0 packs along rows ([rows, cols] ->
      [ceil(rows*bits/32), cols]: GPTQ `qweight` of the transposed [in, out] weight, and the
      compressed-tensors zero point).

Codes are unsigned, in [0, 2**bits - 1]. Words are int32 holding the bit pattern (a word whose
top bit is set reads negative); nothing here depends on the machine's byte order.
"""
from __future__ import annotations

import math
import sys

import torch

from layerquant.errors import InvalidSpec
from layerquant.specs import SUPPORTED_BITS

WORD_BITS = 32


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise InvalidSpec(f"bits={bits} cannot be packed", f"use one of {', '.join(map(str, SUPPORTED_BITS))}")


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words that hold n values of `bits` bits."""
    check_bits(bits)
    return math.ceil(n * bits / WORD_BITS)


def _check_axis(axis: int) -> None:
    if axis not in (0, 1):
        raise InvalidSpec(f"axis={axis} is not a packing axis", "pack along axis 1 (columns) or axis 0 (rows)")


def _as_3d(t: torch.Tensor, axis: int) -> torch.Tensor:
    """View a 2-D tensor as [A, L, B] with the packed axis in the middle (no copy)."""
    return t.unsqueeze(2) if axis == 1 else t.unsqueeze(0)


def _from_3d(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.squeeze(2) if axis == 1 else t.squeeze(0)


def pack_codes(codes: torch.Tensor, bits: int, axis: int = 1) -> torch.Tensor:
    """Pack unsigned integer codes [rows, cols] into int32 words along `axis` (layout above)."""
    check_bits(bits)
    _check_axis(axis)
    if codes.dim() != 2:
        raise InvalidSpec(f"codes must be 2-D, got shape {tuple(codes.shape)}", "pack one [rows, cols] matrix at a time")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise InvalidSpec(f"codes must be an integer tensor, got {codes.dtype}", "pass the uint8 codes of a QuantizedWeight")
    n = codes.shape[axis]
    n_words = math.ceil(n * bits / WORD_BITS)
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > (1 << bits) - 1:
            raise InvalidSpec(
                f"codes span [{lo}, {hi}], outside the {bits}-bit range [0, {(1 << bits) - 1}]",
                "quantize with the same bit width you pack with",
            )
    # int32 throughout: values are < 256, shifts stay inside the word, and torch's int32 left
    # shift wraps (two's complement), so bit 31 lands where it should
    v = _as_3d(codes.to(torch.int32), axis)
    a, _, b = v.shape
    # 32 values always fill exactly `bits` words: pad the line to whole 32-value blocks
    v = torch.nn.functional.pad(v, (0, 0, 0, (-n) % WORD_BITS)).reshape(a, -1, WORD_BITS, b)
    words = torch.zeros(a, v.shape[1], bits, b, dtype=torch.int32, device=codes.device)
    for i in range(WORD_BITS):
        w, s = divmod(i * bits, WORD_BITS)
        words[:, :, w] |= v[:, :, i] << s
        if s + bits > WORD_BITS:  # 3 bits: the value's high bits spill into the next word
            words[:, :, w + 1] |= v[:, :, i] >> (WORD_BITS - s)
    return _from_3d(words.reshape(a, -1, b)[:, :n_words], axis).contiguous()


def unpack_codes(words: torch.Tensor, bits: int, n: int, axis: int = 1) -> torch.Tensor:
    """Inverse of pack_codes: int32 words -> uint8 codes with n values along `axis`."""
    check_bits(bits)
    _check_axis(axis)
    if words.dim() != 2 or words.dtype != torch.int32:
        raise InvalidSpec(
            f"packed words must be a 2-D int32 tensor, got {words.dtype} of shape {tuple(words.shape)}",
            "pass the output of pack_codes",
        )
    n_words = words.shape[axis]
    if n_words != math.ceil(n * bits / WORD_BITS):
        raise InvalidSpec(
            f"{n_words} words per line cannot hold exactly {n} values of {bits} bits",
            f"expected {math.ceil(n * bits / WORD_BITS)} words: pass the n the codes were packed with",
        )
    if sys.byteorder == "little":
        return _unpack_bytes(words, bits, n, axis)
    return _unpack_words(words, bits, n, axis)


def _unpack_words(words: torch.Tensor, bits: int, n: int, axis: int) -> torch.Tensor:
    """Portable path (any byte order): shift the int32 words, 32 codes per `bits` words."""
    n_words = words.shape[axis]
    mask = (1 << bits) - 1
    w = _as_3d(words, axis)
    a, _, b = w.shape
    w = torch.nn.functional.pad(w, (0, 0, 0, (-n_words) % bits)).reshape(a, -1, bits, b)
    out = torch.empty(a, w.shape[1], WORD_BITS, b, dtype=torch.uint8, device=words.device)
    for i in range(WORD_BITS):
        wi, s = divmod(i * bits, WORD_BITS)
        if s + bits <= WORD_BITS:
            # an arithmetic shift of a negative word fills ones from the top; the mask drops them
            out[:, :, i] = (w[:, :, wi] >> s) & mask
        else:
            low_bits = WORD_BITS - s
            low = (w[:, :, wi] >> s) & ((1 << low_bits) - 1)
            high = (w[:, :, wi + 1] & ((1 << (bits - low_bits)) - 1)) << low_bits
            out[:, :, i] = low | high
    return _from_3d(out.reshape(a, -1, b)[:, :n], axis).contiguous()


def _unpack_bytes(words: torch.Tensor, bits: int, n: int, axis: int) -> torch.Tensor:
    """Fast path on little-endian hosts: the words' bytes, in memory order, are the bitstream
    itself. 2/4/8 bits come out of uint8 shifts; for 3 bits every 3 bytes hold 8 whole codes.
    Several times faster than shifting int32 words 32 times."""
    mask = (1 << bits) - 1
    raw = _as_3d(words, axis)  # [A, L, B] int32
    if bits == 3:
        raw = torch.nn.functional.pad(raw, (0, 0, 0, (-raw.shape[1]) % 3))
    raw = raw.contiguous()
    a, length, b = raw.shape
    by = raw.view(torch.uint8).reshape(a, length, b, 4)  # byte k of a word = stream bits 8k..8k+7
    if bits == 3:
        stream = by.permute(0, 1, 3, 2).reshape(a, length * 4 // 3, 3, b).to(torch.int32)
        trio = stream[:, :, 0] | (stream[:, :, 1] << 8) | (stream[:, :, 2] << 16)  # 24 bits = 8 codes
        out = torch.empty(a, trio.shape[1], 8, b, dtype=torch.uint8, device=words.device)
        for j in range(8):
            out[:, :, j] = (trio >> (3 * j)) & mask
        out = out.reshape(a, -1, b)[:, :n]
        return _from_3d(out, axis).contiguous()
    per = 8 // bits
    if per == 1:
        vals = by.unsqueeze(-1)
    else:
        vals = torch.stack([(by >> (j * bits)) & mask for j in range(per)], dim=-1)  # [A, L, B, 4, per]
    out = vals.permute(0, 1, 3, 4, 2).reshape(a, length * 4 * per, b)[:, :n]
    return _from_3d(out, axis).contiguous()
