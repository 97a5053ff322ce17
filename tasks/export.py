"""Export: the quantized model as a normal transformers folder (dequantized weights) + report.json."""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.block_artifact import BlockArtifact
from layerquant.infra.checkpoint import atomic_output_dir, write_json, write_model_streaming
from layerquant.solvers.reconstruct import apply_block_artifact
from layerquant.solvers.runtime_model import RuntimeModel
from layerquant.tasks.context import RunContext, ref_of, retry_transient


@task(name="export", task_run_name="export / dequantized model", cache_policy=NO_CACHE, persist_result=False,
      retries=1, retry_delay_seconds=[5],
      retry_condition_fn=retry_transient)
def export_dequantized(config: dict, blocks: list[dict], report: dict) -> str:
    logger = get_run_logger()
    ctx = RunContext.open(config)
    reader = ctx.reader
    current: dict = {"index": None, "weights": {}}
    # a rotated run's layers were quantized in the rotated basis: written back in the original one
    model = RuntimeModel.plan(reader.arch, reader.config, ctx.config.runtime_quant(), tied_embeddings=not reader.has(reader.arch.lm_head_name))

    def block_weights(index: int) -> dict:
        # tensor names arrive sorted, so each block's names are contiguous: keep one block in memory
        if current["index"] != index:
            tensors, meta = ctx.store.get_tensors(ref_of(blocks[index]["block"]))
            artifact = BlockArtifact.decode(tensors, meta["layers"])
            weights = apply_block_artifact(model.block_weights(reader.block_weights(index)), artifact)
            current["index"], current["weights"] = index, model.exported_block_weights(weights)
        return current["weights"]

    def replace(name: str):
        for index in range(reader.n_blocks):
            prefix = reader.block_prefix(index)
            if name.startswith(prefix):
                return block_weights(index)[name[len(prefix):]]
        return None

    out = ctx.config.out
    with atomic_output_dir(out) as tmp:
        write_model_streaming(reader, tmp, replace)
        write_json(tmp / "report.json", report)
    logger.info("wrote %s", out)
    return str(out)
