"""The block artifact's layout, in one place: what a reconstructed decoder block stores.

A block artifact is one safetensors file plus a JSON meta in the store. Tensors:
    "{layer}.{part}"    each quantized layer's stored parts (codes/scales/zeros, or PB-LLM's),
                        `layer` block-relative, e.g. "self_attn.q_proj.codes"
    "override.{param}"  a full replacement for a block parameter (e.g. a tweaked norm weight)
Meta "layers": one record per quantized layer, in quantization order:
    {"name", "spec", "shape", ...measured fields ("error", "damp", "seconds", "n_weights",
    "storage_bits")}, kept verbatim so that reports read them unchanged.

Pure: dicts of tensors and JSON-able lists in and out, no I/O. The writer (tasks/blocks.py) and
every reader (reconstruct.apply_block_artifact, validation, export, pack) go through this, so
the layout cannot drift between them. Encoding keeps names, order and meta exactly as they were
written before this module existed, so stored keys and sha256s do not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from layerquant.errors import ArtifactMalformed
from layerquant.specs import QuantSpec
from layerquant.tuning import lowrank_storage_bits

if TYPE_CHECKING:  # tensors pass through untouched: the codec itself needs no torch
    import torch

OVERRIDE_PREFIX = "override."


@dataclass(frozen=True)
class LayerRecord:
    """One quantized layer of a block: its block-relative name, spec and [out, in] shape, plus
    what was measured when it was quantized (`stats`, in the order it is stored)."""

    name: str
    spec: QuantSpec
    shape: tuple[int, int]
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def measured(cls, name: str, spec: QuantSpec, shape: tuple[int, int], error: float, damp: float,
                 seconds: float, tensors: dict[str, "torch.Tensor"] | None = None) -> "LayerRecord":
        """A record with the fields reports read: the error, the damping used, the time taken,
        and the weight count and storage bits that average bits per weight are summed from.
        `tensors` (the layer's stored parts): a low-rank correction among them adds its float16
        factors to the storage bits."""
        out_features, in_features = shape
        return cls(name, spec, (out_features, in_features), {
            "error": error, "damp": damp, "seconds": round(seconds, 3), "n_weights": out_features * in_features,
            "storage_bits": spec.storage_bits(out_features, in_features) + lowrank_storage_bits(tensors or {}),
        })

    def to_meta(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec.to_dict(), "shape": list(self.shape), **self.stats}

    @classmethod
    def from_meta(cls, data: dict[str, Any]) -> "LayerRecord":
        try:
            name, spec, shape = data["name"], data["spec"], data["shape"]
        except (KeyError, TypeError):
            raise ArtifactMalformed(f"block artifact layer record {data!r} lacks name, spec or shape",
                                    "the artifact was not written by layerquant's block task; re-run the block") from None
        stats = {key: value for key, value in data.items() if key not in ("name", "spec", "shape")}
        return cls(name, QuantSpec.from_dict(spec), (int(shape[0]), int(shape[1])), stats)


@dataclass
class BlockArtifact:
    """A block's quantized layers (records in order, each layer's stored parts) and overrides."""

    layers: list[LayerRecord]
    tensors_by_layer: dict[str, dict[str, "torch.Tensor"]]  # layer name -> part -> tensor
    overrides: dict[str, "torch.Tensor"] = field(default_factory=dict)  # block parameter -> value

    def layer_tensors(self, name: str) -> dict[str, "torch.Tensor"]:
        """The stored parts of one layer (what `stored_weight` and `QuantizedWeight` read)."""
        try:
            return self.tensors_by_layer[name]
        except KeyError:
            raise ArtifactMalformed(f"layer {name!r} is not in this block artifact",
                                    f"it holds {', '.join(r.name for r in self.layers) or 'no layers'}") from None

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {record.name: record.shape for record in self.layers}

    def encode(self) -> tuple[dict[str, "torch.Tensor"], list[dict[str, Any]]]:
        """(tensors to store, the meta's "layers" list): layers' parts in record order, then
        the overrides."""
        tensors = {f"{record.name}.{part}": value for record in self.layers for part, value in self.layer_tensors(record.name).items()}
        tensors |= {OVERRIDE_PREFIX + param: value for param, value in self.overrides.items()}
        return tensors, [record.to_meta() for record in self.layers]

    @classmethod
    def decode(cls, tensors: dict[str, "torch.Tensor"], meta_layers: list[dict[str, Any]]) -> "BlockArtifact":
        """The artifact from stored tensors and its meta's "layers" list. Every tensor must
        belong to a recorded layer or be an override: anything else means the layout is not
        the one this code reads, and guessing would quietly drop weights."""
        layers = [LayerRecord.from_meta(data) for data in meta_layers]
        tensors_by_layer: dict[str, dict[str, Any]] = {record.name: {} for record in layers}
        # longest name first, so a layer whose name extends another's claims its own parts
        by_length = sorted(tensors_by_layer, key=len, reverse=True)
        overrides = {}
        for key, value in tensors.items():
            if key.startswith(OVERRIDE_PREFIX):
                overrides[key[len(OVERRIDE_PREFIX):]] = value
                continue
            owner = next((name for name in by_length if key.startswith(name + ".")), None)
            if owner is None:
                raise ArtifactMalformed(f"block artifact tensor {key!r} belongs to no recorded layer",
                                        "the artifact was not written by layerquant's block task; re-run the block")
            tensors_by_layer[owner][key[len(owner) + 1:]] = value
        return cls(layers, tensors_by_layer, overrides)
