"""Validation: perplexity of the float and of the quantized model on the evaluation windows."""
from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.block_artifact import BlockArtifact
from layerquant.config import CODE_VERSION
from layerquant.infra.store import artifact_key, sha256_bytes
from layerquant.cancellation import raise_if_cancelled
from layerquant.solvers import architectures as arch_ops
from layerquant.solvers.evaluation import stream_perplexity
from layerquant.solvers.reconstruct import apply_block_artifact
from layerquant.tasks.context import RunContext, cached, ref_of, retry_transient
from layerquant.tasks.token_windows import token_windows

STAGE = "eval"


def eval_windows(ctx: RunContext):
    return token_windows(ctx.store, ctx.config, "evaluation")


def model_perplexity(ctx: RunContext, windows, block_refs: list[dict] | None, batch_size: int = 8) -> dict:
    """Streamed perplexity of the float model (block_refs None) or of the quantized one."""
    reader = ctx.reader
    context = arch_ops.BlockContext(reader.arch, reader.config, windows.shape[1])

    def blocks():
        for index in range(reader.n_blocks):
            raise_if_cancelled()
            weights = reader.block_weights(index)
            if block_refs is not None:
                tensors, meta = ctx.store.get_tensors(ref_of(block_refs[index]))
                weights = apply_block_artifact(weights, BlockArtifact.decode(tensors, meta["layers"]))
            block = arch_ops.build_block(reader.arch, reader.config, index, weights)
            yield lambda hidden, block=block, index=index: arch_ops.run_block(block, context, index, hidden, batch_size)

    norm = arch_ops.family_norm(reader.arch, reader.config, reader.final_norm_weight())
    embed = reader.embed_weight()
    # tied embeddings: one tensor serves both ends (Gemma 3's is 671 MB in float32)
    head = reader.lm_head_weight() if reader.has(reader.arch.lm_head_name) else embed
    softcap = getattr(reader.config, "final_logit_softcapping", None)
    return stream_perplexity(
        windows,
        lambda tokens: arch_ops.embed_tokens(reader.arch, reader.config, embed, tokens),
        blocks(),
        lambda hidden, targets: arch_ops.token_nll(hidden, norm, head, targets, softcap),
    )


@task(name="evaluate", task_run_name="validate / {variant} perplexity", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=retry_transient)
def evaluate(config: dict, variant: str, blocks: list[dict]) -> dict:
    """variant "float": the original model; "quant": with each block's stored quantization."""
    logger = get_run_logger()
    ctx = RunContext.open(config)
    windows = eval_windows(ctx)
    if variant == "float":
        upstream = [ref_of(b["block"]).meta["weights_fp"] for b in blocks]
    else:
        upstream = [ref_of(b["block"]).sha256 for b in blocks]
    head_names = [ctx.reader.arch.embed_name, ctx.reader.arch.final_norm_name]
    upstream += [ctx.reader.fingerprint(n for n in head_names + [ctx.reader.arch.lm_head_name] if ctx.reader.has(n))]
    key = artifact_key(STAGE, CODE_VERSION, upstream, {"variant": variant, "windows": sha256_bytes(windows.numpy().tobytes())})
    hit = cached(ctx.store, STAGE, key, logger)
    if hit is not None:
        result = ctx.store.get_json(hit) | {"timing": {}}
        logger.info("%s perplexity %.4f (cached)", variant, result["ppl"])
        return result
    started = time.perf_counter()
    result = model_perplexity(ctx, windows, [b["block"] for b in blocks] if variant == "quant" else None)
    result.update({"variant": variant, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])})
    ctx.store.put_json(STAGE, key, result)
    logger.info("%s perplexity %.4f on %d windows x %d tokens", variant, result["ppl"], windows.shape[0], windows.shape[1])
    # this call's compute time, for the report's time split (not stored: a cached result took none)
    return result | {"timing": {"evaluation": round(time.perf_counter() - started, 3)}}
