"""Validation: perplexity of the float and of the quantized model on the evaluation windows, and
the quantized model's divergence from the float one (KL, top-1 agreement, paired perplexity ratio).

The float evaluation stores its last hidden states; the quantized evaluation scores its own next
to them, window by window, in the same streamed pass that computes its perplexity."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.block_artifact import BlockArtifact
from layerquant.runtime_quant import RuntimeQuant
from layerquant.cancellation import raise_if_cancelled
from layerquant.config import CODE_VERSION
from layerquant.infra.checkpoint import CheckpointReader
from layerquant.infra.store import artifact_key, sha256_bytes
from layerquant.solvers import architectures as arch_ops
from layerquant.solvers.evaluation import stream_perplexity
from layerquant.solvers.reconstruct import apply_block_artifact
from layerquant.solvers.runtime_model import RuntimeModel
from layerquant.tasks.context import RunContext, cached, ref_of, retry_transient
from layerquant.tasks.token_windows import token_windows

STAGE = "eval"
HIDDEN_STAGE = "eval-hidden"

WeightsTransform = Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def eval_windows(ctx: RunContext, text_index: int = 0):
    """The evaluation windows of the run's `text_index`-th evaluation text."""
    return token_windows(ctx.store, ctx.config, "evaluation", text_index=text_index)


def model_blocks(reader: CheckpointReader, seqlen: int, transform: WeightsTransform | None = None,
                 batch_size: int = 8) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """One callable per decoder block, each built when reached (one block's weights in memory);
    `transform(index, weights)` replaces a block's float weights (e.g. by their quantized values)."""
    context = arch_ops.BlockContext(reader.arch, reader.config, seqlen)
    for index in range(reader.n_blocks):
        raise_if_cancelled()
        weights = reader.block_weights(index)
        if transform is not None:
            weights = transform(index, weights)
        block = arch_ops.build_block(reader.arch, reader.config, index, weights)
        yield lambda hidden, block=block, index=index: arch_ops.run_block(block, context, index, hidden, batch_size)


def stored_quantization(ctx: RunContext, block_refs: list[dict]) -> WeightsTransform:
    """Each block's weights as its stored quantization artifact makes them."""
    def transform(index: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors, meta = ctx.store.get_tensors(ref_of(block_refs[index]))
        return apply_block_artifact(weights, BlockArtifact.decode(tensors, meta["layers"]))
    return transform


def model_ends(reader: CheckpointReader) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], int]:
    """The embedding (tokens -> hidden), the LM head (final norm, head weights, softcap: hidden
    [T, H] -> logits [T, V]) and V."""
    embed = reader.embed_weight()
    norm = arch_ops.family_norm(reader.arch, reader.config, reader.final_norm_weight())
    # tied embeddings: one tensor serves both ends (Gemma 3's is 671 MB in float32)
    weight = reader.lm_head_weight() if reader.has(reader.arch.lm_head_name) else embed
    softcap = getattr(reader.config, "final_logit_softcapping", None)
    return (lambda tokens: arch_ops.embed_tokens(reader.arch, reader.config, embed, tokens),
            lambda hidden: arch_ops.head_logits(hidden, norm, weight, softcap), int(weight.shape[0]))


def reader_perplexity(reader: CheckpointReader, windows: torch.Tensor, transform: WeightsTransform | None = None,
                      reference: tuple[torch.Tensor, CheckpointReader] | None = None) -> tuple[dict, torch.Tensor]:
    """Streamed perplexity of the model `reader` reads (its weights through `transform`), and
    against `reference` = (the reference's last hidden states, its reader) the divergence from it.
    Returns the summary and the last hidden states."""
    embed, head, vocab = model_ends(reader)
    reference_hidden, reference_head = None, None
    if reference is not None:
        reference_hidden, reference_reader = reference
        reference_head = head if reference_reader is reader else model_ends(reference_reader)[1]
    return stream_perplexity(windows, embed, model_blocks(reader, windows.shape[1], transform), head, vocab,
                             reference_hidden, reference_head)


def model_perplexity(ctx: RunContext, windows, block_refs: list[dict] | None) -> dict:
    """Streamed perplexity of the float model (block_refs None) or of the quantized one."""
    if runs_as_runtime_model(ctx):
        return runtime_perplexity(ctx, windows, block_refs)
    transform = None if block_refs is None else stored_quantization(ctx, block_refs)
    return reader_perplexity(ctx.reader, windows, transform)[0]


def compare_models(reader: CheckpointReader, baseline: CheckpointReader, windows: torch.Tensor) -> dict:
    """The model `reader` reads against `baseline`, on the same windows: the baseline's streamed
    pass first (its last hidden states kept), then the model's, scored side by side with them."""
    _, baseline_hidden = reader_perplexity(baseline, windows)
    return reader_perplexity(reader, windows, reference=(baseline_hidden, baseline))[0]


def runs_as_runtime_model(ctx: RunContext) -> bool:
    """Activation/KV quantization, rotation or a float prompt cache: the model is evaluated as it
    runs (RuntimeModel), without the float-reference divergence of weight-only runs."""
    runtime = ctx.config.runtime_quant()
    return bool(runtime.enabled or runtime.prompt_kv_tokens)


def runtime_perplexity(ctx: RunContext, windows, block_refs: list[dict] | None, batch_size: int = 8) -> dict:
    """The quantized model exactly as it runs (rotated weights, online rotations, fake-quantized
    activations and KV cache), or the float model (block_refs None); with prompt_kv_tokens, only
    the continuations after the shared prompt are scored."""
    reader, cfg = ctx.reader, ctx.config
    settings = cfg.runtime_quant() if block_refs is not None else RuntimeQuant()
    model = RuntimeModel.plan(reader.arch, reader.config, settings, tied_embeddings=not reader.has(reader.arch.lm_head_name))

    def block_weights(index: int):
        weights = model.block_weights(reader.block_weights(index))
        if block_refs is not None:
            tensors, meta = ctx.store.get_tensors(ref_of(block_refs[index]))
            weights = apply_block_artifact(weights, BlockArtifact.decode(tensors, meta["layers"]))
        return weights

    embed = reader.embed_weight()
    head = reader.lm_head_weight() if reader.has(reader.arch.lm_head_name) else embed  # tied: one tensor, as above
    return model.perplexity(windows, reader.n_blocks, block_weights, embed, reader.final_norm_weight(), head,
                            score_from=cfg.prompt_kv_tokens, batch_size=batch_size, between_blocks=raise_if_cancelled)


@task(name="evaluate", task_run_name="validate / {variant} perplexity", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=retry_transient)
def evaluate(config: dict, variant: str, blocks: list[dict], text_index: int = 0, reference: dict | None = None) -> dict:
    """variant "float": the original model (its last hidden states are stored, under "hidden");
    "quant": with each block's stored quantization, scored against `reference` (the float
    evaluation's result on the same text) when given. `text_index`: which evaluation text."""
    logger = get_run_logger()
    ctx = RunContext.open(config)
    windows = eval_windows(ctx, text_index)
    if variant == "float":
        upstream = [ref_of(b["block"]).meta["weights_fp"] for b in blocks]
    else:
        upstream = [ref_of(b["block"]).sha256 for b in blocks]
    head_names = [ctx.reader.arch.embed_name, ctx.reader.arch.final_norm_name]
    upstream += [ctx.reader.fingerprint(n for n in head_names + [ctx.reader.arch.lm_head_name] if ctx.reader.has(n))]
    settings = {"variant": variant, "windows": sha256_bytes(windows.numpy().tobytes()), "scores": "per-window+kl"}
    runtime = ctx.config.runtime_quant().identity()
    if variant == "quant" and runtime:  # absent when off: weight-only runs keep their keys
        settings["runtime_quant"] = runtime
    if ctx.config.prompt_kv_tokens:
        settings["score_from"] = ctx.config.prompt_kv_tokens
    if reference is not None and "hidden" in reference:  # a float result of a run-time model keeps none
        upstream += [reference["hidden"]["sha256"]]
    # "scores": the per-window, hidden-state-keeping evaluation (results before it had neither)
    key = artifact_key(STAGE, CODE_VERSION, upstream, settings)
    as_runtime = runs_as_runtime_model(ctx)
    hit = cached(ctx.store, STAGE, key, logger)
    keeps_hidden = variant == "float" and not as_runtime
    if hit is not None and (not keeps_hidden or cached(ctx.store, HIDDEN_STAGE, key, logger) is not None):
        result = ctx.store.get_json(hit) | {"timing": {}}
        logger.info("%s perplexity %.4f (cached)", variant, result["ppl"])
        return result
    started = time.perf_counter()
    if as_runtime:
        result, hidden = runtime_perplexity(ctx, windows, [b["block"] for b in blocks] if variant == "quant" else None), None
    else:
        transform = stored_quantization(ctx, [b["block"] for b in blocks]) if variant == "quant" else None
        reference_pair = None
        if reference is not None and "hidden" in reference:
            tensors, _ = ctx.store.get_tensors(ref_of(reference["hidden"]))
            reference_pair = (tensors["hidden"], ctx.reader)
        result, hidden = reader_perplexity(ctx.reader, windows, transform, reference_pair)
    result.update({"variant": variant, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])})
    if keeps_hidden:
        result["hidden"] = ctx.store.put_tensors(HIDDEN_STAGE, key, {"hidden": hidden.contiguous()}).to_dict()
    ctx.store.put_json(STAGE, key, result)
    logger.info("%s perplexity %.4f on %d windows x %d tokens", variant, result["ppl"], windows.shape[0], windows.shape[1])
    if "kl_mean" in result:
        logger.info("%s KL from float %.5f (p99 %.5f), top-1 agreement %.4f", variant, result["kl_mean"], result["kl_p99"],
                    result["top1_agreement"])
    # this call's compute time, for the report's time split (not stored: a cached result took none)
    return result | {"timing": {"evaluation": round(time.perf_counter() - started, 3)}}
