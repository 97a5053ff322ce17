"""Spec types shared by every layer of layerquant: frozen, validated, JSON round-trippable.

`QuantSpec` says how one weight matrix is quantized (a bit plan maps layer names to specs);
`ArtifactRef` is what tasks pass to each other instead of tensors.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from layerquant.errors import InvalidSpec

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("rtn", "gptq", "pbllm")
SCALE_BITS = 16  # scales are stored (and used) as fp16 values, so the size count is honest
PER_CHANNEL = 0  # group_size value meaning one group spanning the whole input dimension


def salient_position_encoding(rows: int, cols: int, n_salient: int) -> tuple[str, int, int, int]:
    """How PB-LLM stores where its salient weights are, and what it costs in bits:
    ("none", 0, ...) without salient weights; ("index", bits, count_bits, column_bits) for a
    per-row count plus each salient weight's column index, when that beats ("bitmap", rows * cols,
    ...), one bit per weight. Sparse salient sets on wide matrices take the index form: 5% of a
    2048-column matrix costs 0.55 bits per weight as indices, 1 as a bitmap."""
    count_bits = max(1, math.ceil(math.log2(cols + 1)))
    column_bits = max(1, math.ceil(math.log2(cols)))
    if n_salient == 0:
        return "none", 0, count_bits, column_bits
    index = rows * count_bits + n_salient * column_bits
    if index < rows * cols:
        return "index", index, count_bits, column_bits
    return "bitmap", rows * cols, count_bits, column_bits


@dataclass(frozen=True)
class QuantSpec:
    """How one linear weight [out_features, in_features] is quantized.

    Grid convention (all methods that produce integer codes):
        w_hat[r, c] = scale[r, g(c)] * (q[r, c] - zero[r, g(c)]),  q in [0, 2**bits - 1],
    groups run along input columns, g(c) = c // group_size, the last group may be shorter.
    Symmetric grids use zero = 2**(bits-1) (not stored) and a signed scale that puts the group's
    largest-magnitude weight on the level q = 0 (solvers/grid.py); asymmetric grids store an
    integer zero.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    method: str = "gptq"
    # These defaults are the run's defaults too (RunConfig and the CLI read them from here).
    # act_order and clip_search are on: both cost nothing at inference (static groups keep the
    # natural column order) and cut 3-bit stories260K perplexity from 7.97 to 6.58
    # (bench/stories_methods.py). Pass False for the plain algorithm.
    act_order: bool = True
    # search a shrunk (clipped) range per row/group instead of plain absmax/min-max
    clip_search: bool = True
    # PB-LLM: fraction of weights kept at `salient_bits`, the rest binarized.
    salient_fraction: float = 0.0
    salient_bits: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidSpec(f"method {self.method!r} is unknown", f"use one of {', '.join(METHODS)}")
        if self.method == "pbllm":
            if not 0.0 <= self.salient_fraction < 1.0:
                raise InvalidSpec(
                    f"salient_fraction {self.salient_fraction} is out of range", "use a value in [0, 1)"
                )
            if self.salient_bits not in SUPPORTED_BITS:
                raise InvalidSpec(f"salient_bits {self.salient_bits} unsupported", f"use one of {SUPPORTED_BITS}")
        elif self.bits not in SUPPORTED_BITS:
            raise InvalidSpec(f"bits={self.bits} is not supported", f"use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size < 0 or (0 < self.group_size < 8):
            raise InvalidSpec(
                f"group_size={self.group_size} is out of range",
                "use 0 for per-channel or a group size of at least 8 (32, 64, 128 are typical)",
            )

    # -- storage ---------------------------------------------------------------------------
    def n_groups(self, in_features: int) -> int:
        size = self.group_size or in_features
        return math.ceil(in_features / size)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits needed to store this matrix in this spec: codes, scales, zeros, masks."""
        n_weights = out_features * in_features
        groups = out_features * self.n_groups(in_features)
        if self.method == "pbllm":
            # a 1-bit sign for every binarized weight + where the salient weights are (bitmap or
            # column indices, whichever is smaller) + the salient values at salient_bits,
            # + per-group fp16 scale and fp16 mean of the binarized part, + per-row fp16 scale
            # of the salient part.
            n_salient = math.ceil(self.salient_fraction * n_weights)
            return (
                (n_weights - n_salient)
                + salient_position_encoding(out_features, in_features, n_salient)[1]
                + n_salient * self.salient_bits
                + groups * 2 * SCALE_BITS
                + out_features * SCALE_BITS
            )
        zero_bits = 0 if self.sym else self.bits
        # act_order uses static groups: codes stay in natural column order, so no g_idx or
        # permutation has to be stored (group of column c is c // group_size)
        return n_weights * self.bits + groups * (SCALE_BITS + zero_bits)

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.storage_bits(out_features, in_features) / (out_features * in_features)

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidSpec(f"unknown spec fields {sorted(unknown)}", f"known fields: {sorted(known)}")
        return cls(**data)

    def label(self) -> str:
        if self.method == "pbllm":
            return f"pbllm-s{self.salient_fraction:g}-g{self.group_size}"
        side = "sym" if self.sym else "asym"
        return f"{self.method}-w{self.bits}-g{self.group_size or 'ch'}-{side}{'-ao' if self.act_order else ''}{'-clip' if self.clip_search else ''}"


@dataclass(frozen=True)
class ArtifactRef:
    """A small, JSON-able pointer to one artifact in the store: what tasks return."""

    uri: str
    sha256: str
    kind: str  # "tensors" (safetensors) or "json"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "kind": self.kind, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArtifactRef":
        return cls(uri=data["uri"], sha256=data["sha256"], kind=data["kind"], meta=dict(data.get("meta", {})))


def canonical_json(obj: Any) -> str:
    """Deterministic JSON used for hashing keys: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
