"""Packing: the quantized model in a format inference engines read (compressed-tensors
pack-quantized, or the GPTQ checkpoint format), written block by block from the store."""
from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

from layerquant.errors import InvalidSpec
from layerquant.infra.checkpoint import INDEX_NAME, TOKENIZER_FILES, atomic_output_dir
from layerquant.kernels import formats
from layerquant.solvers.grid import QuantizedWeight
from layerquant.solvers.reconstruct import stored_weight
from layerquant.specs import QuantSpec
from layerquant.tasks.context import RunContext, ref_of, retry_transient

PACK_FORMATS = ("compressed-tensors", "gptq")


@task(name="pack", task_run_name="pack / {fmt}", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=[5],
      retry_condition_fn=retry_transient)
def pack_model(config: dict, blocks: list[dict], report: dict, fmt: str, out: str) -> str:
    if fmt not in PACK_FORMATS:
        raise InvalidSpec(f"pack format {fmt!r} is unknown", f"use one of {', '.join(PACK_FORMATS)}")
    logger = get_run_logger()
    ctx = RunContext.open(config)
    reader = ctx.reader
    model_dtype = reader.dtype_of(reader.arch.embed_name)
    weight_map: dict[str, str] = {}
    layer_args: dict[str, dict] = {}
    specs: list[QuantSpec] = []
    float_layers: list[str] = []
    n_shards = reader.n_blocks + 1
    with atomic_output_dir(out) as tmp:
        block_names: set[str] = set()
        for index in range(reader.n_blocks):
            prefix = reader.block_prefix(index)
            tensors_in, meta = ctx.store.get_tensors(ref_of(blocks[index]["block"]))
            weights = reader.block_weights(index, dtype=None)
            block_names.update(prefix + name for name in weights)
            shard: dict = {}
            quantized = set()
            for layer in meta["layers"]:
                name, spec = layer["name"], QuantSpec.from_dict(layer["spec"])
                parts = {k[len(name) + 1:]: v for k, v in tensors_in.items() if k.startswith(name + ".")}
                if spec.method == "pbllm":
                    # no inference engine reads PB-LLM: ship the layer dequantized, listed in `ignore`
                    float_layers.append(prefix + name)
                    shard[f"{prefix}{name}.weight"] = stored_weight(parts, spec).to(weights[f"{name}.weight"].dtype)
                    quantized.add(f"{name}.weight")
                    continue
                qw = QuantizedWeight.from_tensors(parts, spec)
                if fmt == "compressed-tensors":
                    tensors, args = formats.ct_layer_tensors(prefix + name, qw, scale_dtype=model_dtype)
                    layer_args[prefix + name] = args
                else:
                    tensors = formats.gptq_layer_tensors(prefix + name, qw)
                    specs.append(spec)
                shard.update(tensors)
                quantized.add(f"{name}.weight")
            overrides = {k[len("override."):]: v for k, v in tensors_in.items() if k.startswith("override.")}
            for name, tensor in weights.items():
                if name not in quantized:
                    shard[prefix + name] = overrides.get(name, tensor).to(tensor.dtype).contiguous()
            shard_name = f"model-{index + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(shard, tmp / shard_name, metadata={"format": "pt"})
            weight_map.update({name: shard_name for name in shard})
        rest = {name: reader.tensor(name) for name in reader.weight_map if name not in block_names}
        shard_name = f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"
        save_file(rest, tmp / shard_name, metadata={"format": "pt"})
        weight_map.update({name: shard_name for name in rest})
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        model_config = dict(reader.config_dict)
        if fmt == "compressed-tensors":
            ignore = ["lm_head", *float_layers]
            model_config["quantization_config"] = formats.ct_quantization_config(layer_args, ignore=ignore)
        else:
            quant_config = formats.gptq_quantization_config(specs, damp_percent=ctx.config.damp_percent)
            model_config["quantization_config"] = quant_config
            (tmp / "quantize_config.json").write_text(json.dumps(quant_config, indent=2))
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
        for fname in TOKENIZER_FILES:
            if (reader.model_dir / fname).is_file():
                (tmp / fname).write_bytes((reader.model_dir / fname).read_bytes())
        packed_report = {**report, "pack_format": fmt}
        (tmp / "report.json").write_text(json.dumps(packed_report, indent=2))
    if packed_report["vllm_unservable"]:
        logger.warning("%d layers cannot be served by vLLM (2/3-bit or PB-LLM): %s", len(packed_report["vllm_unservable"]),
                       ", ".join(packed_report["vllm_unservable"][:6]))
    logger.info("packed %s model written to %s", fmt, out)
    return str(out)

