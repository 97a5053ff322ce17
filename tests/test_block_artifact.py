"""The block artifact codec: bit-exact round trips, and the very layout blocks were stored in
before the codec existed (so store keys and sha256s are unchanged)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from layerquant.block_artifact import BlockArtifact, LayerRecord
from layerquant.errors import ArtifactMalformed
from layerquant.solvers.grid import rtn_quantize
from layerquant.solvers.reconstruct import apply_block_artifact, stored_weight
from layerquant.specs import QuantSpec

GRID = QuantSpec(bits=4, group_size=32, method="rtn")
PBLLM = QuantSpec(method="pbllm", group_size=32)


def _outcomes():
    """(name, spec, stored parts, shape, error, damp, seconds) as a block reconstruction yields them."""
    torch.manual_seed(0)
    q = rtn_quantize(torch.randn(48, 64), GRID).to_tensors()
    from layerquant.solvers.pbllm import binarize_partial

    w = torch.randn(64, 64)
    pb = binarize_partial(w, torch.eye(64) + 0.1, PBLLM).to_tensors()
    return [("self_attn.q_proj", GRID, q, (48, 64), 1.5e-3, 0.01, 0.123456),
            ("mlp.down_proj", PBLLM, pb, (64, 64), 2.5e-2, 0.02, 1.0)]


def _old_layout(outcomes, overrides):
    """What tasks/blocks.py wrote before the codec, verbatim."""
    tensors = {f"{name}.{part}": value for name, _, parts, *_ in outcomes for part, value in parts.items()}
    tensors |= {f"override.{param}": value for param, value in overrides.items()}
    layers = []
    for name, spec, _, (out_features, in_features), error, damp, seconds in outcomes:
        layers.append({
            "name": name, "spec": spec.to_dict(), "shape": [out_features, in_features], "error": error, "damp": damp,
            "seconds": round(seconds, 3), "n_weights": out_features * in_features,
            "storage_bits": spec.storage_bits(out_features, in_features),
        })
    return tensors, layers


def _artifact(outcomes, overrides):
    return BlockArtifact([LayerRecord.measured(name, spec, shape, error, damp, seconds)
                          for name, spec, _, shape, error, damp, seconds in outcomes],
                         {name: parts for name, _, parts, *_ in outcomes}, overrides)


def test_encode_reproduces_the_stored_layout_byte_for_byte():
    outcomes, overrides = _outcomes(), {"input_layernorm.weight": torch.randn(64)}
    tensors, layers = _artifact(outcomes, overrides).encode()
    old_tensors, old_layers = _old_layout(outcomes, overrides)
    assert list(tensors) == list(old_tensors)
    assert save(tensors) == save(old_tensors)  # the bytes whose sha256 the store records
    assert layers == old_layers and [list(l) for l in layers] == [list(l) for l in old_layers]


def test_decode_encode_round_trip_is_bit_exact():
    outcomes, overrides = _outcomes(), {"input_layernorm.weight": torch.randn(64), "self_attn.q_norm.weight": torch.randn(16)}
    tensors, layers = _old_layout(outcomes, overrides)
    artifact = BlockArtifact.decode(tensors, layers)
    assert [r.name for r in artifact.layers] == ["self_attn.q_proj", "mlp.down_proj"]
    assert artifact.layers[1].spec == PBLLM and artifact.shapes()["self_attn.q_proj"] == (48, 64)
    for name, _, parts, *_ in outcomes:
        got = artifact.layer_tensors(name)
        assert list(got) == list(parts) and all(torch.equal(got[k], parts[k]) and got[k].dtype == parts[k].dtype for k in parts)
    assert set(artifact.overrides) == set(overrides)
    again_tensors, again_layers = artifact.encode()
    assert again_layers == layers and save(again_tensors) == save(tensors)


def test_a_layer_whose_name_extends_another_keeps_its_own_parts():
    tensors = {"mlp.up.codes": torch.zeros(1), "mlp.up.x.codes": torch.ones(1)}
    layers = [{"name": "mlp.up", "spec": GRID.to_dict(), "shape": [1, 1]}, {"name": "mlp.up.x", "spec": GRID.to_dict(), "shape": [1, 1]}]
    artifact = BlockArtifact.decode(tensors, layers)
    assert list(artifact.layer_tensors("mlp.up")) == ["codes"] and artifact.layer_tensors("mlp.up.x")["codes"].item() == 1


def test_apply_block_artifact_dequantizes_layers_and_applies_overrides():
    outcomes, overrides = _outcomes(), {"input_layernorm.weight": torch.randn(64, dtype=torch.float16)}
    artifact = BlockArtifact.decode(*_old_layout(outcomes, overrides))
    floats = {"self_attn.q_proj.weight": torch.zeros(48, 64), "mlp.down_proj.weight": torch.zeros(64, 64),
              "input_layernorm.weight": torch.zeros(64), "post_attention_layernorm.weight": torch.ones(64)}
    weights = apply_block_artifact(floats, artifact)
    for name, spec, parts, *_ in outcomes:
        assert torch.equal(weights[f"{name}.weight"], stored_weight(parts, spec))
    assert torch.equal(weights["input_layernorm.weight"], overrides["input_layernorm.weight"].float())
    assert weights["post_attention_layernorm.weight"] is floats["post_attention_layernorm.weight"]


@pytest.mark.parametrize("tensors, layers", [
    ({"stray.codes": torch.zeros(1)}, []),
    ({}, [{"name": "mlp.up", "shape": [1, 1]}]),
])
def test_a_layout_this_code_does_not_read_is_a_typed_error(tensors, layers):
    with pytest.raises(ArtifactMalformed):
        BlockArtifact.decode(tensors, layers)
