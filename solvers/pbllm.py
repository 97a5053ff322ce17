"""PB-LLM (Shang et al. 2023): partially binarized weights with GPTQ-style error feedback.

A fraction `spec.salient_fraction` of the weights ("salient") is kept on a symmetric per-row
grid at `spec.salient_bits`; every other weight is binarized per row and group as
    w_hat = mean + alpha * (+1 if w >= mean else -1),
starting from PB-LLM's mean and alpha = mean |w - mean| over the group's non-salient weights
(the least-squares alpha for that mean) and refined by a few 2-means steps, which move the two
levels mean +- alpha to the means of the weights on either side. Columns are processed one at a
time as in GPTQ, each column's error pushed onto the later columns through the inverse Hessian
with lazy blocks; a group's levels are fitted when its first column comes up, on the weights as
the feedback has left them.

Salient weights are chosen by the OBS saliency w^2 / [U]_jj^2 (U the upper Cholesky factor of
H^-1, the quantity GPTQ divides by), as PB-LLM's GPTQ variant does. The count is exact,
ceil(salient_fraction * n_weights), because `QuantSpec.storage_bits` counts exactly that many
salient codes: a global ranking on the original weights fixes how many salient weights each lazy
block gets, and each block re-ranks its own (error-updated) weights when it starts.

Storage (`to_tensors`, all safetensors dtypes), dense LSB-first bitstreams in uint8: where the
salient weights are, as a bitmap (`mask`) or, when smaller, as per-row counts
(`salient_counts`) plus column indices in row-major order (`salient_columns`), the choice and
its cost given by `specs.salient_position_encoding`; the signs of the binarized weights only
(`signs`, row-major over the non-salient positions); the salient codes. Then per-row fp16
salient scale; per-row-per-group fp16 alpha and mean; and a 2-element int64 `shape` that, like
a safetensors header's shapes, is layout metadata and not counted as payload.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from layerquant.errors import InvalidSpec
from layerquant.specs import QuantSpec, salient_position_encoding
from layerquant.solvers.gptq import hessian_weighted_error, lazy_block_size, prepare_error_feedback
from layerquant.solvers.grid import expand_groups, fit_grid, group_bounds, quantize_codes

# 2-means refinement steps of each group's two binary levels (see _binary_params)
LLOYD_STEPS = 3
# tensors whose bytes are the stored payload; "shape" is layout metadata (see module docstring)
PAYLOAD_KEYS = ("mask", "salient_counts", "salient_columns", "signs", "salient_codes", "salient_scale", "alpha", "mean")
REQUIRED_KEYS = ("shape", "signs", "salient_codes", "salient_scale", "alpha", "mean")


# -- bitstreams -------------------------------------------------------------------------------
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit values (any shape, read row-major) -> uint8 LSB-first bitstream.

    Value i occupies stream bits [i*bits, (i+1)*bits); stream bit b is bit (b % 8) of byte b // 8.
    n values take ceil(n*bits/8) bytes; the tail of the last byte is zero.
    """
    if not 1 <= bits <= 32:
        raise InvalidSpec(f"cannot bit-pack {bits}-bit values", "use 1 to 32 bits")
    # codes and flags (<= 8 bits) in uint8; column indices need up to 32 bits
    v = values.reshape(-1).to(torch.uint8 if bits <= 8 else torch.int64)
    shifts = torch.arange(bits, dtype=v.dtype)
    stream = ((v[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, torch.zeros(pad, dtype=torch.uint8)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    # at most one bit per position, so the byte sum cannot overflow uint8
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first n `bits`-bit values as int64 [n]."""
    if packed.numel() != math.ceil(n * bits / 8):
        raise InvalidSpec(
            f"bitstream of {packed.numel()} bytes cannot hold exactly {n} values of {bits} bits",
            "the stored PB-LLM tensors do not belong together; re-run quantization",
        )
    shifts = torch.arange(8, dtype=torch.uint8)
    stream = ((packed.reshape(-1).to(torch.uint8)[:, None] >> shifts) & 1).reshape(-1)[: n * bits]
    place = 1 << torch.arange(bits, dtype=torch.int64)
    return (stream.reshape(n, bits).to(torch.int64) * place).sum(dim=1)


def _unpack_flags(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A 1-bit stream as bool [rows, cols], without unpack_bits' int64 intermediate (a
    4096 x 11008 mask would take 360 MB that way)."""
    n = rows * cols
    if packed.numel() != math.ceil(n / 8):
        raise InvalidSpec(
            f"bitstream of {packed.numel()} bytes cannot hold a {rows}x{cols} mask",
            "the stored PB-LLM tensors do not belong together; re-run quantization",
        )
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.reshape(-1).to(torch.uint8)[:, None] >> shifts) & 1).reshape(-1)[:n].reshape(rows, cols).bool()


# -- result -----------------------------------------------------------------------------------
@dataclass
class PBLLMResult:
    """One PB-LLM matrix, exactly reconstructable from its fields.

    mask: bool [out, in] (True = salient); signs: bool [out, in] (True = +alpha, ignored where
    salient); salient_codes: int64 [n_salient] in row-major mask order, codes in
    [0, 2**salient_bits - 1] around the symmetric zero 2**(salient_bits - 1); salient_scale:
    float32 [out]; alpha, mean: float32 [out, n_groups]. All float fields are fp16-exact.
    """

    mask: torch.Tensor
    signs: torch.Tensor
    salient_codes: torch.Tensor
    salient_scale: torch.Tensor
    alpha: torch.Tensor
    mean: torch.Tensor
    spec: QuantSpec
    damp_used: float = 0.0
    weighted_error: float = float("nan")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape
        zero = float(1 << (self.spec.salient_bits - 1))
        mean = expand_groups(self.mean.float(), cols, self.spec.group_size)
        alpha = expand_groups(self.alpha.float(), cols, self.spec.group_size)
        w = torch.where(self.signs, mean + alpha, mean - alpha)
        salient = self.salient_scale.float()[:, None].expand(rows, cols)[self.mask] * (self.salient_codes.float() - zero)
        w[self.mask] = salient
        return w.to(dtype)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        rows, cols = self.shape
        n_salient = int(self.salient_codes.numel())
        encoding, _, count_bits, column_bits = salient_position_encoding(rows, cols, n_salient)
        tensors = {"shape": torch.tensor([rows, cols], dtype=torch.int64)}
        if encoding == "bitmap":
            tensors["mask"] = pack_bits(self.mask, 1)
        elif encoding == "index":
            tensors["salient_counts"] = pack_bits(self.mask.sum(dim=1), count_bits)
            tensors["salient_columns"] = pack_bits(self.mask.nonzero()[:, 1], column_bits)  # row-major, as codes are
        return tensors | {
            "signs": pack_bits(self.signs[~self.mask], 1),
            "salient_codes": pack_bits(self.salient_codes, self.spec.salient_bits),
            "salient_scale": self.salient_scale.to(torch.float16),
            "alpha": self.alpha.to(torch.float16),
            "mean": self.mean.to(torch.float16),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> "PBLLMResult":
        missing = set(REQUIRED_KEYS) - set(tensors)
        if missing:
            raise InvalidSpec(f"PB-LLM tensors lack {sorted(missing)}", "re-run quantization: the block artifact is incomplete")
        rows, cols = (int(v) for v in tensors["shape"].tolist())
        expected = salient_count(spec, rows, cols)
        mask = _decode_positions(tensors, rows, cols, expected, spec)
        groups = spec.n_groups(cols)
        if tuple(tensors["alpha"].shape) != (rows, groups) or tuple(tensors["mean"].shape) != (rows, groups):
            raise InvalidSpec(
                f"PB-LLM alpha/mean shapes {tuple(tensors['alpha'].shape)} do not fit [{rows}, {groups}]",
                "the tensors were written under another group size; re-run quantization",
            )
        signs = torch.zeros(rows, cols, dtype=torch.bool)
        signs[~mask] = _unpack_flags(tensors["signs"], 1, rows * cols - expected).reshape(-1)
        return cls(
            mask=mask,
            signs=signs,
            salient_codes=unpack_bits(tensors["salient_codes"], spec.salient_bits, expected),
            salient_scale=tensors["salient_scale"].float(),
            alpha=tensors["alpha"].float(),
            mean=tensors["mean"].float(),
            spec=spec,
        )


def _decode_positions(tensors: dict[str, torch.Tensor], rows: int, cols: int, n_salient: int, spec: QuantSpec) -> torch.Tensor:
    """The salient mask [rows, cols] from whichever position encoding the tensors carry, checked
    against the count the spec pays for."""
    encoding, _, count_bits, column_bits = salient_position_encoding(rows, cols, n_salient)
    stored = "mask" if "mask" in tensors else "index" if "salient_counts" in tensors and "salient_columns" in tensors else "none"
    if {"mask": "bitmap"}.get(stored, stored) != encoding:
        raise InvalidSpec(
            f"PB-LLM tensors store salient positions as {stored!r}, the spec {spec.label()} needs {encoding!r} "
            f"for {n_salient} salient weights",
            "the tensors were written under another spec (salient fraction); re-run quantization",
        )
    if encoding == "none":
        return torch.zeros(rows, cols, dtype=torch.bool)
    if encoding == "bitmap":
        mask = _unpack_flags(tensors["mask"], rows, cols)
        found = int(mask.sum())
    else:
        counts = unpack_bits(tensors["salient_counts"], count_bits, rows)
        found = int(counts.sum())
        if found != n_salient:
            raise InvalidSpec(
                f"PB-LLM counts mark {found} salient weights, the spec {spec.label()} needs {n_salient}",
                "the tensors were written under another spec; re-run quantization",
            )
        columns = unpack_bits(tensors["salient_columns"], column_bits, n_salient)
        if n_salient and int(columns.max()) >= cols:
            raise InvalidSpec(f"PB-LLM column index {int(columns.max())} is outside {cols} columns",
                              "the stored PB-LLM tensors are corrupt; re-run quantization")
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        mask[torch.repeat_interleave(torch.arange(rows), counts), columns] = True
        found = int(mask.sum())  # a repeated column would collapse
    if found != n_salient:
        raise InvalidSpec(
            f"PB-LLM mask marks {found} salient weights, the spec {spec.label()} needs {n_salient}",
            "the tensors were written under another spec; re-run quantization",
        )
    return mask


def salient_count(spec: QuantSpec, rows: int, cols: int) -> int:
    """Exactly the number of salient weights `QuantSpec.storage_bits` pays for."""
    return math.ceil(spec.salient_fraction * rows * cols)


def payload_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits of stored payload in `to_tensors()` output (the `shape` metadata excluded)."""
    return sum(tensors[key].numel() * tensors[key].element_size() * 8 for key in PAYLOAD_KEYS if key in tensors)


# -- solver -----------------------------------------------------------------------------------
def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def _binary_params(w: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (mean, alpha) of the two-level quantizer mean +- alpha over the entries where
    `keep` ([rows, cols]), rounded to fp16 as stored; a row with no such entry gets 0, 0.

    Starts from PB-LLM's mean and alpha = mean |w - mean| (the least-squares alpha for that
    mean), then takes LLOYD_STEPS 2-means steps: the levels become the means of the weights on
    each side, which can only lower the squared error of the binarized part (1-2% lower
    Hessian-weighted error on stories260K).
    """
    keep_f = keep.float()
    count = keep_f.sum(dim=1).clamp(min=1)
    mean = (w * keep_f).sum(dim=1) / count
    alpha = ((w - mean[:, None]).abs() * keep_f).sum(dim=1) / count
    for _ in range(LLOYD_STEPS):
        pos = (w >= mean[:, None]).float() * keep_f
        neg = keep_f - pos
        n_pos, n_neg = pos.sum(dim=1), neg.sum(dim=1)
        hi = torch.where(n_pos > 0, (w * pos).sum(dim=1) / n_pos.clamp(min=1), mean + alpha)
        lo = torch.where(n_neg > 0, (w * neg).sum(dim=1) / n_neg.clamp(min=1), mean - alpha)
        mean, alpha = (hi + lo) / 2, (hi - lo) / 2
    return _fp16(mean), _fp16(alpha)


def _top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries, ties taken in position order (deterministic).

    A selection (kthvalue) instead of a full sort: the global ranking of a 4096 x 11008 matrix
    would otherwise hold 45M int64 indices.
    """
    flat = score.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest
    mask = flat > threshold
    missing = k - int(mask.sum())
    ties = (flat == threshold).nonzero().squeeze(1)[:missing]
    mask[ties] = True
    return mask.reshape(score.shape)


def binarize_partial(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp_percent: float = 0.01,
    layer: str = "layer",
) -> PBLLMResult:
    """PB-LLM of one matrix [out, in] given its input Hessian [in, in].

    With spec.act_order, columns are processed by decreasing Hessian diagonal and everything
    data-dependent is fixed up front on the original weights (static mask and group
    parameters), so the stored layout keeps natural column order.
    """
    if spec.method != "pbllm":
        raise InvalidSpec(f"binarize_partial got a {spec.method!r} spec for {layer}", "pass a spec with method='pbllm'")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise InvalidSpec(
            f"Hessian of {layer} is {tuple(hessian.shape)}, the weight has {cols} input columns",
            "pass the Hessian of this layer's inputs",
        )
    w, perm, inv_perm, hinv, damp_used = prepare_error_feedback(weight, hessian, spec.act_order, damp_percent, layer)

    bounds = group_bounds(cols, spec.group_size)
    group_size = spec.group_size or cols
    n_groups = len(bounds)
    n_salient = salient_count(spec, rows, cols)

    d = torch.diag(hinv)  # processing order

    # the salient grid is fitted once per row on the original weights: salient weights are
    # the row's large ones, so its absmax is (nearly) theirs
    sal_scale, sal_zero = fit_grid(w, spec.salient_bits, sym=True)

    # global ranking on the original weights (processing order)
    w = w[:, perm]
    score = w.pow(2) / d.pow(2)[None, :]
    global_mask = _top_mask(score, n_salient)
    del score

    mean = torch.zeros(rows, n_groups)
    alpha = torch.zeros(rows, n_groups)
    fitted = torch.zeros(n_groups, dtype=torch.bool)
    group_of_col = perm // group_size
    if spec.act_order:
        nat_mask = global_mask[:, inv_perm]
        nat_w = w[:, inv_perm]
        for g, (start, end) in enumerate(bounds):
            mean[:, g], alpha[:, g] = _binary_params(nat_w[:, start:end], ~nat_mask[:, start:end])
        fitted[:] = True
        del nat_mask, nat_w
    block = lazy_block_size(group_size, spec.act_order)

    mask = torch.zeros(rows, cols, dtype=torch.bool)
    signs = torch.zeros(rows, cols, dtype=torch.bool)
    codes = torch.zeros(rows, cols)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if spec.act_order:
            m1 = global_mask[:, i1:i2]
        else:
            # same number of salient weights as the global ranking gave this block, re-chosen on
            # the weights as earlier blocks' error feedback left them
            quota = int(global_mask[:, i1:i2].sum())
            m1 = _top_mask(w1.pow(2) / d[i1:i2].pow(2)[None, :], quota)
        mask[:, i1:i2] = m1
        for i in range(i2 - i1):
            g = int(group_of_col[i1 + i])
            if not fitted[g]:
                start, end = bounds[g]
                # natural order: the group starts at this column and lies inside this block
                mean[:, g], alpha[:, g] = _binary_params(w1[:, i : i + (end - start)], ~m1[:, i : i + (end - start)])
                fitted[g] = True
            col = w1[:, i]
            sal_q = quantize_codes(col, sal_scale, sal_zero, spec.salient_bits)
            sign = col >= mean[:, g]
            col_hat = torch.where(
                m1[:, i],
                sal_scale * (sal_q - sal_zero),
                torch.where(sign, mean[:, g] + alpha[:, g], mean[:, g] - alpha[:, g]),
            )
            codes[:, i1 + i] = sal_q
            signs[:, i1 + i] = sign
            e = (col - col_hat) / hinv1[i, i]
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)  # fused rank-1 update, as in GPTQ
            err1[:, i] = e
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)

    mask = mask[:, inv_perm]
    signs = signs[:, inv_perm] & ~mask
    codes = codes[:, inv_perm]
    result = PBLLMResult(
        mask=mask,
        signs=signs,
        salient_codes=codes[mask].to(torch.int64),
        salient_scale=sal_scale,
        alpha=alpha,
        mean=mean,
        spec=spec,
        damp_used=damp_used,
    )
    result.weighted_error = hessian_weighted_error(weight, result.dequantize(), hessian)
    return result
