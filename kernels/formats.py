"""Checkpoint formats that real clients load: compressed-tensors `pack-quantized` and GPTQ (v1/v2).

Pure functions: QuantizedWeight in, {tensor name: tensor} and JSON-able dicts out. Writing files
(safetensors shards, config.json, quantize_config.json) is the exporter's job; it calls
`pack_block` block by block and `checkpoint_config_files` once at the end with what they returned.

compressed-tensors `pack-quantized` (checked against compressed-tensors 0.20.0's
PackedQuantizationCompressor and the dequantize it runs; transformers loads it through that):
    {layer}.weight_packed      int32 [out, ceil(in*bits/32)]  dense bitstream along `in`
                               (packing.py's layout, = its pack_to_int32(packed_dim=1))
    {layer}.weight_scale       [out, n_groups] in the model dtype (the loader allocates the
                               scale parameter in the weight's dtype and casts into it)
    {layer}.weight_zero_point  asymmetric only: int32 [ceil(out*bits/32), n_groups], packed along
                               `out` (pack_to_int32(packed_dim=0))
    {layer}.weight_shape       int64 [2] = (out, in)
  Values: compressed-tensors quantizes to signed ints in [-2**(b-1), 2**(b-1)-1] and packs
  them with +2**(b-1), dequantizing scale * (q_signed - zp_signed). Our unsigned codes q and zeros
  z are exactly the packed (offset) values: q_signed = q - 2**(b-1), zp_signed = z - 2**(b-1), and
  the differences agree. Symmetric schemes store no zero point; it is 0 signed, i.e. our
  z = 2**(b-1), which the solvers use for symmetric grids (checked here).
  Ragged groups: its group strategy requires in % group_size == 0 (it raises otherwise), so a
  layer whose last group is short is written with the largest group size g' that divides both
  group_size and the ragged tail, each scale repeated group_size/g' times: the same weights
  exactly, more scale bytes. One group spanning the whole row is written as the channel strategy.
  2/3-bit layers need a compressed-tensors with 1..8-bit pack-quantized and dense 3-bit packing
  (0.20.0 has both). vLLM's pack-quantized kernels take 4/8 bits; vLLM fuses q/k/v and gate/up
  shards and wants them in one config group.

Run-time quantization (issue 16) in compressed-tensors: what the run fake-quantized while it
ran is written where the schema has a place for it (checked against compressed-tensors 0.20.0's
QuantizationArgs and its dynamic quantization, compute_dynamic_scales_and_zp):
  activations  each config group's `input_activations`: symmetric int, `dynamic: true`,
               strategy "token" (one scale per token over the last dim) or "group" with
               act_group_size when that divides the layer's input width (solvers/activations.py
               falls back to one scale per token otherwise, and so does the config);
  KV cache     `kv_cache_scheme`: asymmetric int, `dynamic: true`, strategy "group" with
               group_size = kv_group_size, or head_dim for one scale per head and token. Not
               "token": compressed-tensors applies it to [batch, heads, seq, head_dim] and its
               token strategy reduces over everything past dim 1 (one scale per head and
               sequence), while a group reduces the last dim only (per head, token and group).
  Not expressible: the float prompt cache (prompt_kv_tokens; clients quantize the whole cache),
  rotations (refused at config time), low-rank corrections (refused: pack dequantized).
  The grids differ in one detail: compressed-tensors' symmetric scale is amax / ((2^b - 1) / 2)
  (amax / 127.5 at 8 bits) where ours is amax / (2^(b-1) - 1), and its asymmetric range always
  contains 0; what a client computes therefore differs slightly from the run's evaluation
  (measured in tests/test_runtime_pack.py).

GPTQ (AutoGPTQ / GPTQModel, "gptq" = v1, "gptq_v2"):
    {layer}.qweight  int32 [in*bits/32, out]     codes packed along `in` (packing.py, axis=0)
    {layer}.qzeros   int32 [n_groups, out*bits/32] zeros packed along `out`; v1 stores zero-1
    {layer}.scales   float16 [n_groups, out]
    {layer}.g_idx    int32 [in]                   group of each input column (c // group_size)
  w = scales[g_idx[c], o] * (code[c, o] - zero[g_idx[c], o]). Uniform bits/group/sym only
  (one quantize_config for the model), 4 or 8 bits (what GPTQ kernels load widely).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from layerquant.block_artifact import BlockArtifact
from layerquant.errors import InvalidSpec
from layerquant.kernels.packing import pack_codes
from layerquant.quantized import QuantizedWeight
from layerquant.runtime_quant import RuntimeQuant
from layerquant.specs import QuantSpec
from layerquant.tuning import has_lowrank_correction

log = logging.getLogger(__name__)

CT_FORMAT = "pack-quantized"
CT_QUANT_METHOD = "compressed-tensors"
GPTQ_BITS = (4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_qw(qw: QuantizedWeight) -> tuple[int, int, int]:
    spec = qw.spec
    if spec.method == "pbllm":
        raise InvalidSpec("PB-LLM layers have no integer grid to pack",
                          "export PB-LLM layers dequantized (list them in `ignore`) or quantize them with rtn/gptq")
    out_f, in_f = qw.codes.shape
    size = spec.group_size or in_f
    groups = math.ceil(in_f / size)
    if tuple(qw.scales.shape) != (out_f, groups) or tuple(qw.zeros.shape) != (out_f, groups):
        raise InvalidSpec(f"scales/zeros of shape {tuple(qw.scales.shape)}/{tuple(qw.zeros.shape)} do not fit "
                          f"codes {tuple(qw.codes.shape)} with group_size {spec.group_size}",
                          "pass a QuantizedWeight produced by the solvers")
    if spec.sym and not bool((qw.zeros == (1 << (spec.bits - 1))).all()):
        raise InvalidSpec(f"a symmetric {spec.bits}-bit layer has zeros other than {1 << (spec.bits - 1)}",
                          "mark the spec sym=False, or re-quantize on a symmetric grid")
    return out_f, in_f, groups


# ----------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# ----------------------------------------------------------------------------------------------
def ct_export_group_size(in_features: int, group_size: int) -> int:
    """Group size written to the checkpoint: 0 (channel strategy) when one group spans the row;
    group_size when it divides in_features; else the largest divisor of both group_size and the
    ragged tail (the group strategy cannot express a short last group)."""
    if group_size == 0 or group_size >= in_features:
        return 0
    tail = in_features % group_size
    return group_size if tail == 0 else math.gcd(group_size, tail)


def ct_weight_args(bits: int, group_size: int, sym: bool, in_features: int) -> dict[str, Any]:
    """The `weights` QuantizationArgs of one layer, as compressed-tensors serialises them."""
    g = ct_export_group_size(in_features, group_size)
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": "group" if g else "channel",
        "group_size": g if g else None,
        "dynamic": False,
    }


def ct_input_activation_args(settings: RuntimeQuant | None, in_features: int) -> dict[str, Any] | None:
    """A layer's `input_activations` QuantizationArgs: the per-token (or per-group) dynamic
    symmetric int quantization the run applied at its input; None when activations stay float.
    A group size that does not divide the input width falls back to one scale per token, as
    solvers/activations.fake_quant_symmetric does."""
    if settings is None or not settings.quantizes_activations:
        return None
    group = settings.act_group_size if settings.act_group_size and in_features % settings.act_group_size == 0 else 0
    return {
        "num_bits": settings.act_bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if group else "token",
        "group_size": group or None,
        "dynamic": True,
    }


def ct_kv_cache_scheme(settings: RuntimeQuant | None, head_dim: int) -> dict[str, Any] | None:
    """config.json's `kv_cache_scheme`: keys and values quantized dynamically per head and token
    (or group of head channels), asymmetric, as FakeQuantKVCache does; None with a float cache.
    Written as the group strategy (see the module doc for why not "token")."""
    if settings is None or not settings.quantizes_cache:
        return None
    group = settings.kv_group_size if settings.kv_group_size and head_dim % settings.kv_group_size == 0 else head_dim
    return {
        "num_bits": settings.kv_bits,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": group,
        "dynamic": True,
    }


def ct_layer_tensors(name: str, qw: QuantizedWeight,
                     scale_dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One linear layer in `pack-quantized` form.

    Returns (tensors keyed `{name}.weight_*`, the layer's weight args for ct_quantization_config).
    scale_dtype is the model's dtype. The solvers' scales are fp16-exact, so float16 and float32
    reproduce the weights exactly; bfloat16 rounds each scale to 8 mantissa bits (logged).
    """
    if scale_dtype not in SCALE_DTYPES:
        raise InvalidSpec(f"scale dtype {scale_dtype} is not a float dtype", "pass the model dtype (float16, bfloat16, float32)")
    out_f, in_f, groups = _check_qw(qw)
    bits, sym = qw.spec.bits, qw.spec.sym
    size = qw.spec.group_size or in_f
    g = ct_export_group_size(in_f, qw.spec.group_size)
    if g and g != size:
        log.warning("%s: in_features %d is not a multiple of group_size %d; written with group_size %d "
                    "(scales repeated, weights unchanged)", name, in_f, size, g)
    n_export = math.ceil(in_f / g) if g else 1
    # original group of each exported group (identity unless regrouped)
    src = (torch.arange(n_export, device=qw.scales.device) * (g or in_f)) // size
    scales = qw.scales.float()[:, src]
    zeros = qw.zeros[:, src]
    scale_out = scales.to(scale_dtype)
    if not torch.equal(scale_out.float(), scales):
        rel = ((scale_out.float() - scales).abs() / scales.abs().clamp(min=1e-30)).max().item()
        log.warning("%s: scales are not exact in %s (max relative change %.2e); the checkpoint's weights "
                    "differ from the evaluated ones by that much", name, scale_dtype, rel)
    tensors = {
        f"{name}.weight_packed": pack_codes(qw.codes, bits, axis=1),
        f"{name}.weight_scale": scale_out.contiguous(),
        f"{name}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not sym:
        tensors[f"{name}.weight_zero_point"] = pack_codes(zeros, bits, axis=0)
    return tensors, ct_weight_args(bits, qw.spec.group_size, sym, in_f)


def ct_quantization_config(layer_args: Mapping[str, Mapping[str, Any]], ignore: Sequence[str] = (),
                           version: str | None = None, input_args: Mapping[str, Mapping[str, Any] | None] | None = None,
                           kv_cache_scheme: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json's `quantization_config`: one config group per distinct (weight args, input
    activation args), each targeting its layers by exact-name regex (`re:^name$`); `ignore`
    lists float linear layers (e.g. lm_head) so that class-based matching in clients never
    quantizes them. `input_args`: layer -> its `input_activations` (ct_input_activation_args;
    absent or None: float inputs); `kv_cache_scheme`: ct_kv_cache_scheme's."""
    if not layer_args:
        raise InvalidSpec("no quantized layers to describe", "pass the weight args returned by ct_layer_tensors")
    input_args = input_args or {}

    def frozen(args: Mapping[str, Any] | None) -> tuple | None:
        return None if args is None else tuple(sorted(args.items(), key=lambda kv: kv[0]))

    by_args: dict[tuple, list[str]] = {}
    for name, args in layer_args.items():
        key = (frozen(args), frozen(input_args.get(name)))
        by_args.setdefault(key, []).append(name)
    overlap = set(ignore) & set(layer_args)
    if overlap:
        raise InvalidSpec(f"layers both quantized and ignored: {sorted(overlap)}", "list each layer in one place only")

    def order(key: tuple) -> tuple:
        a, inputs = dict(key[0]), dict(key[1] or {})
        return (a["num_bits"], a["strategy"], a["group_size"] or 0, not a["symmetric"], inputs.get("num_bits", 0),
                inputs.get("strategy", ""), inputs.get("group_size") or 0)

    groups = {}
    for i, key in enumerate(sorted(by_args, key=order)):
        groups[f"group_{i}"] = {
            "targets": [f"re:^{re.escape(n)}$" for n in sorted(by_args[key])],
            "weights": dict(key[0]),
            "input_activations": None if key[1] is None else dict(key[1]),
            "output_activations": None,
            "format": CT_FORMAT,
        }
    config: dict[str, Any] = {
        "quant_method": CT_QUANT_METHOD,
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None if kv_cache_scheme is None else dict(kv_cache_scheme),
        "global_compression_ratio": None,
        "sparsity_config": {},
    }
    if version:
        config["version"] = version
    return config


# ----------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------
def gptq_layer_tensors(name: str, qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """One linear layer as GPTQ tensors (layout in the module doc)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise InvalidSpec(f"GPTQ checkpoint format {checkpoint_format!r} is unknown", f"use one of {', '.join(GPTQ_FORMATS)}")
    out_f, in_f, groups = _check_qw(qw)
    bits = qw.spec.bits
    if bits not in GPTQ_BITS:
        raise InvalidSpec(f"{name}: {bits}-bit layers are not written in GPTQ format",
                          "use 4 or 8 bits for GPTQ export, or export compressed-tensors (pack-quantized) instead")
    per = 32 // bits
    if in_f % per or out_f % per:
        raise InvalidSpec(f"{name}: shape ({out_f}, {in_f}) does not fill whole int32 words at {bits} bits",
                          f"GPTQ needs in_features and out_features divisible by {per}; export compressed-tensors instead")
    zeros = qw.zeros.t().to(torch.int32)  # [groups, out]
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            # v1 stores zero-1; a zero point of 0 wraps to all ones and clients that add the 1
            # back word-wise carry into the neighbouring value
            raise InvalidSpec(f"{name}: an asymmetric zero point of 0 cannot be stored in GPTQ v1",
                              "export with checkpoint_format='gptq_v2', use a symmetric grid, or export compressed-tensors")
        zeros = zeros - 1
    size = qw.spec.group_size or in_f
    return {
        f"{name}.qweight": pack_codes(qw.codes.t(), bits, axis=0),
        f"{name}.qzeros": pack_codes(zeros, bits, axis=1),
        f"{name}.scales": qw.scales.t().to(torch.float16).contiguous(),
        f"{name}.g_idx": torch.arange(in_f, dtype=torch.int32, device=qw.codes.device) // size,
    }


def gptq_quantization_config(specs: Sequence[Any], checkpoint_format: str = "gptq", damp_percent: float = 0.01,
                             tool: str = "layerquant") -> dict[str, Any]:
    """quantize_config.json, also config.json's `quantization_config`: one (bits, group_size,
    sym) for the whole model. `specs` are the QuantSpecs of every quantized layer."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise InvalidSpec(f"GPTQ checkpoint format {checkpoint_format!r} is unknown", f"use one of {', '.join(GPTQ_FORMATS)}")
    if not specs:
        raise InvalidSpec("no quantized layers to describe", "pass the QuantSpec of every quantized layer")
    kinds = {(s.method == "pbllm", s.bits, s.group_size, s.sym) for s in specs}
    if len(kinds) != 1:
        raise InvalidSpec(f"GPTQ format needs one bits/group_size/sym for the whole model, got {sorted(kinds)}",
                          "export mixed-precision models in compressed-tensors format (config groups per layer)")
    pb, bits, group_size, sym = kinds.pop()
    if pb or bits not in GPTQ_BITS:
        raise InvalidSpec(f"{bits}-bit models are not written in GPTQ format", "use 4 or 8 bits, or export compressed-tensors")
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size or -1,
        "sym": sym,
        # act-order runs here use static groups: codes stay in column order, g_idx is c // group_size
        "desc_act": False,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": damp_percent,
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [tool]},
    }


# ----------------------------------------------------------------------------------------------
# Reading packed checkpoints back (layerquant eval, or a packed model as --model)
# ----------------------------------------------------------------------------------------------
def ct_layer_weight(tensors: Mapping[str, torch.Tensor], args: Mapping[str, Any]) -> torch.Tensor:
    """Inverse of ct_layer_tensors, dequantized (float32): `tensors` holds the layer's `weight_*`
    entries (names relative to the layer, e.g. "weight_packed"), `args` its config group's
    `weights`. The group size may be one no QuantSpec takes (a regrouped ragged layer)."""
    from layerquant.kernels.packing import unpack_codes
    from layerquant.quantized import dequantize_grouped

    bits, sym = int(args["num_bits"]), bool(args["symmetric"])
    out_f, in_f = (int(v) for v in tensors["weight_shape"].tolist())
    group = int(args.get("group_size") or 0) if args.get("strategy") == "group" else 0
    codes = unpack_codes(tensors["weight_packed"].to(torch.int32), bits, in_f, axis=1)
    scales = tensors["weight_scale"].float().reshape(out_f, -1)
    if sym:
        zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = unpack_codes(tensors["weight_zero_point"].to(torch.int32), bits, out_f, axis=0)
    return dequantize_grouped(codes, scales, zeros, group)


def gptq_layer_weight(name: str, tensors: Mapping[str, torch.Tensor], quant_config: Mapping[str, Any]) -> torch.Tensor:
    """Inverse of gptq_layer_tensors, dequantized (v1 zeros stored minus one, v2 as they are)."""
    from layerquant.kernels.packing import unpack_codes
    from layerquant.quantized import dequantize_grouped

    bits = int(quant_config["bits"])
    scales = tensors["scales"].float()  # [groups, out]
    n_groups, out_f = scales.shape
    in_f = tensors["g_idx"].shape[0] if "g_idx" in tensors else tensors["qweight"].shape[0] * 32 // bits
    group = int(quant_config.get("group_size", -1))
    group = 0 if group in (-1, 0) or group >= in_f else group
    if "g_idx" in tensors and not torch.equal(tensors["g_idx"].long(), torch.arange(in_f) // (group or in_f)):
        raise InvalidSpec(f"{name}: g_idx is not in natural column order (desc_act checkpoint)", "this reader takes static-group GPTQ only")
    codes = unpack_codes(tensors["qweight"].to(torch.int32), bits, in_f, axis=0).t()
    zeros = unpack_codes(tensors["qzeros"].to(torch.int32), bits, out_f, axis=1).t().to(torch.int32)
    if quant_config.get("checkpoint_format", "gptq") == "gptq":
        zeros = zeros + 1
    return dequantize_grouped(codes.contiguous(), scales.t().contiguous(), zeros, group)


def ct_args_for(layer: str, quant_config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for group in quant_config.get("config_groups", {}).values():
        for target in group.get("targets", []):
            if (target.startswith("re:") and re.match(target[3:], layer)) or target == layer:
                return group["weights"]
    return None


def dequantize_packed(prefix: str, tensors: dict[str, torch.Tensor], quant_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A block's tensors as read from a packed checkpoint (names relative to `prefix`) -> the
    same block with every packed layer replaced by its dequantized `{layer}.weight` (float32)."""
    method = quant_config.get("quant_method")
    if method not in (CT_QUANT_METHOD, "gptq"):
        raise InvalidSpec(f"quantization method {method!r} of the checkpoint cannot be read", "use a dequantized, compressed-tensors or GPTQ folder")
    marker = ".weight_packed" if method == CT_QUANT_METHOD else ".qweight"
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(marker)]:
        layer = key[: -len(marker)]
        parts = {k[len(layer) + 1:]: out.pop(k) for k in list(out) if k.startswith(layer + ".") and k != layer + ".bias"}
        if method == CT_QUANT_METHOD:
            args = ct_args_for(prefix + layer, quant_config)
            if args is None:
                raise InvalidSpec(f"{prefix + layer} is packed but no config group targets it", "the checkpoint's quantization_config is incomplete")
            out[f"{layer}.weight"] = ct_layer_weight(parts, args).float()
        else:
            out[f"{layer}.weight"] = gptq_layer_weight(prefix + layer, parts, quant_config).float()
    return out


# ----------------------------------------------------------------------------------------------
# one block of a packed checkpoint, and the checkpoint's config files
# ----------------------------------------------------------------------------------------------
PACK_FORMATS = ("compressed-tensors", "gptq")
# linear layers that are never quantized, named for clients that match layers by class
CT_ALWAYS_IGNORED = ("lm_head",)


def check_pack_format(fmt: str) -> None:
    if fmt not in PACK_FORMATS:
        raise InvalidSpec(f"pack format {fmt!r} is unknown", f"use one of {', '.join(PACK_FORMATS)}")


def ships_dequantized(spec: QuantSpec) -> bool:
    """Whether a layer goes into packed checkpoints as a float weight: no inference engine reads
    PB-LLM, so such layers ship dequantized and are listed in the config's `ignore`."""
    return spec.method == "pbllm"


@dataclass
class PackedBlock:
    tensors: dict[str, torch.Tensor]  # the block's shard, by full tensor name
    layer_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # compressed-tensors: full layer -> weight args
    specs: list[QuantSpec] = field(default_factory=list)  # GPTQ: the spec of every packed layer
    float_layers: list[str] = field(default_factory=list)  # full names of layers shipped dequantized
    input_args: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # compressed-tensors: full layer -> input activation args


def check_runtime_packable(fmt: str, runtime: RuntimeQuant | None) -> None:
    """GPTQ's quantize_config has no field for activation or KV quantization: a packed folder
    would silently drop what the run measured with. compressed-tensors has (see the module doc)."""
    if fmt == "gptq" and runtime is not None and (runtime.quantizes_activations or runtime.quantizes_cache):
        raise InvalidSpec("the GPTQ format cannot say that activations or the KV cache are quantized",
                          "pack as compressed-tensors (input_activations / kv_cache_scheme), or as dequantized")


def pack_block(fmt: str, prefix: str, artifact: BlockArtifact, float_weights: Mapping[str, torch.Tensor],
               dequantized: Mapping[str, torch.Tensor], scale_dtype: torch.dtype, runtime: RuntimeQuant | None = None) -> PackedBlock:
    """One decoder block as shard tensors in `fmt`.

    `float_weights`: the block's original tensors (block-relative names, checkpoint dtypes);
    `dequantized`: layer -> its float weight, for every layer `ships_dequantized` (computed by
    the caller, which may run the solvers that decode it); `scale_dtype`: the model's dtype.
    Quantized layers are written in the format, the rest of the block as stored, with the
    artifact's overrides (e.g. tweaked norms) in place of the originals. `runtime`: the run's
    activation / KV settings (compressed-tensors writes each layer's input activation args).
    """
    check_pack_format(fmt)
    check_runtime_packable(fmt, runtime)
    packed = PackedBlock({})
    replaced = set()
    for record in artifact.layers:
        name, weight_name = prefix + record.name, f"{record.name}.weight"
        if ships_dequantized(record.spec):
            if record.name not in dequantized:
                raise InvalidSpec(f"{name} ({record.spec.method}) ships dequantized but no float weight was passed",
                                  "pass the dequantized weight of every layer ships_dequantized() selects")
            packed.tensors[f"{name}.weight"] = dequantized[record.name].to(float_weights[weight_name].dtype)
            packed.float_layers.append(name)
        else:
            if has_lowrank_correction(artifact.layer_tensors(record.name)):
                raise InvalidSpec(f"{name} carries a low-rank correction, which the {fmt} format cannot express",
                                  "pack the run with --pack-format dequantized (the correction folded into the weight)")
            qw = QuantizedWeight.from_tensors(artifact.layer_tensors(record.name), record.spec)
            if fmt == "compressed-tensors":
                tensors, packed.layer_args[name] = ct_layer_tensors(name, qw, scale_dtype=scale_dtype)
                packed.input_args[name] = ct_input_activation_args(runtime, record.shape[1])
            else:
                tensors = gptq_layer_tensors(name, qw)
                packed.specs.append(record.spec)
            packed.tensors.update(tensors)
        replaced.add(weight_name)
    for weight_name, tensor in float_weights.items():
        if weight_name not in replaced:
            packed.tensors[prefix + weight_name] = artifact.overrides.get(weight_name, tensor).to(tensor.dtype).contiguous()
    return packed


def checkpoint_config_files(fmt: str, model_config: Mapping[str, Any], blocks: Sequence[PackedBlock],
                            damp_percent: float, runtime: RuntimeQuant | None = None) -> dict[str, dict[str, Any]]:
    """File name -> JSON content: config.json (the model's config with its `quantization_config`)
    and, for GPTQ, quantize_config.json (which GPTQ loaders read). `blocks` may have their
    tensors dropped already; only the layer summaries are read. `runtime`: the run's activation
    / KV settings (compressed-tensors: `kv_cache_scheme`)."""
    check_pack_format(fmt)
    check_runtime_packable(fmt, runtime)
    config = dict(model_config)
    if fmt == "compressed-tensors":
        layer_args = {name: args for block in blocks for name, args in block.layer_args.items()}
        input_args = {name: args for block in blocks for name, args in block.input_args.items()}
        ignore = [*CT_ALWAYS_IGNORED, *(name for block in blocks for name in block.float_layers)]
        text = model_config.get("text_config", model_config)  # multimodal configs nest the decoder's
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        config["quantization_config"] = ct_quantization_config(layer_args, ignore=ignore, input_args=input_args,
                                                               kv_cache_scheme=ct_kv_cache_scheme(runtime, head_dim))
        return {"config.json": config}
    quantize_config = gptq_quantization_config([spec for block in blocks for spec in block.specs], damp_percent=damp_percent)
    config["quantization_config"] = quantize_config
    return {"config.json": config, "quantize_config.json": quantize_config}
