"""Packing: the quantized model in a format inference engines read (compressed-tensors
pack-quantized, or the GPTQ checkpoint format), written block by block from the store.

The task only moves data: the store's block artifacts and the model's float tensors go to
`kernels.formats` (which decides the layout), its shards and config files to the infra writer."""
from __future__ import annotations

from dataclasses import replace

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.block_artifact import BlockArtifact
from layerquant.infra.checkpoint import ShardedCheckpointWriter, atomic_output_dir
from layerquant.kernels import formats
from layerquant.solvers.reconstruct import stored_weight
from layerquant.tasks.context import RunContext, ref_of, retry_transient


@task(name="pack", task_run_name="pack / {fmt}", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=[5],
      retry_condition_fn=retry_transient)
def pack_model(config: dict, blocks: list[dict], report: dict, fmt: str, out: str) -> str:
    formats.check_pack_format(fmt)
    logger = get_run_logger()
    ctx = RunContext.open(config)
    runtime = ctx.config.runtime_quant()
    reader = ctx.reader
    scale_dtype = reader.dtype_of(reader.arch.embed_name)
    summaries: list[formats.PackedBlock] = []
    block_names: set[str] = set()
    with atomic_output_dir(out) as tmp:
        writer = ShardedCheckpointWriter(tmp, n_shards=reader.n_blocks + 1)
        for index in range(reader.n_blocks):
            tensors, meta = ctx.store.get_tensors(ref_of(blocks[index]["block"]))
            artifact = BlockArtifact.decode(tensors, meta["layers"])
            weights = reader.block_weights(index, dtype=None)
            prefix = reader.block_prefix(index)
            block_names.update(prefix + name for name in weights)
            # decoding a layer no engine reads takes the solvers, which the format code may not import
            dequantized = {record.name: stored_weight(artifact.layer_tensors(record.name), record.spec)
                           for record in artifact.layers if formats.ships_dequantized(record.spec)}
            packed = formats.pack_block(fmt, prefix, artifact, weights, dequantized, scale_dtype, runtime)
            writer.write_shard(packed.tensors)
            summaries.append(replace(packed, tensors={}))  # one block's tensors in memory at a time
        writer.write_shard({name: reader.tensor(name) for name in reader.weight_map if name not in block_names})
        packed_report = {**report, "pack_format": fmt}
        config_files = formats.checkpoint_config_files(fmt, reader.config_dict, summaries, ctx.config.damp_percent, runtime)
        writer.finish({**config_files, "report.json": packed_report}, reader.model_dir)
    if packed_report["vllm_unservable"]:
        logger.warning("%d layers cannot be served by vLLM (2/3-bit or PB-LLM): %s", len(packed_report["vllm_unservable"]),
                       ", ".join(packed_report["vllm_unservable"][:6]))
    for statement in packed_report.get("runtime_unservable", []):
        logger.warning("run-time quantization: %s", statement)
    logger.info("packed %s model written to %s", fmt, out)
    return str(out)
