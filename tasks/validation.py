"""Validation: perplexity of the float and of the quantized model on the evaluation windows, and
the quantized model's divergence from the float one (KL, top-1 agreement, paired perplexity ratio).

The float evaluation stores its last hidden states; the quantized evaluation scores its own next
to them, window by window, in the same streamed pass that computes its perplexity.

The float evaluation is content-addressed by the float model itself (each block's weight
fingerprint, the embedding / final norm / LM head fingerprint, config.json), the windows and the
scoring settings, so a `quantize` run and a later `layerquant eval --baseline` of the same float
model on the same windows (any model measured against it, any store user) share one stored pass:
only the first of them streams the float model through its blocks (`float_evaluation`)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.block_artifact import BlockArtifact
from layerquant.runtime_quant import RuntimeQuant
from layerquant.cancellation import raise_if_cancelled
from layerquant.config import CODE_VERSION
from layerquant.infra.checkpoint import CheckpointReader, tensors_fingerprint
from layerquant.infra.memory import release_free_memory
from layerquant.infra.store import ArtifactStore, artifact_key, sha256_bytes
from layerquant.solvers import architectures as arch_ops
from layerquant.solvers.evaluation import paired_ratio, stream_perplexity
from layerquant.solvers.reconstruct import apply_block_artifact
from layerquant.solvers.runtime_model import RuntimeModel
from layerquant.tasks.context import RunContext, cached, ref_of, retry_transient
from layerquant.tasks.token_windows import token_windows

STAGE = "eval"
HIDDEN_STAGE = "eval-hidden"
# the scoring an evaluation artifact holds: per-window NLL sums, and last hidden states kept for
# KL / top-1 against them (results before it had neither)
SCORES = "per-window+kl"

WeightsTransform = Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def eval_windows(ctx: RunContext, text_index: int = 0):
    """The evaluation windows of the run's `text_index`-th evaluation text."""
    return token_windows(ctx.store, ctx.config, "evaluation", text_index=text_index)


def model_blocks(reader: CheckpointReader, seqlen: int, transform: WeightsTransform | None = None,
                 batch_size: int = 8, on_block: Callable[[int], None] | None = None) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """One callable per decoder block, each built when reached (one block's weights in memory);
    `transform(index, weights)` replaces a block's float weights (e.g. by their quantized values);
    `on_block(index)` is told of each block as it is built (what a pass really ran)."""
    context = arch_ops.BlockContext(reader.arch, reader.config, seqlen)
    for index in range(reader.n_blocks):
        raise_if_cancelled()
        if on_block is not None:
            on_block(index)
        weights = reader.block_weights(index)
        if transform is not None:
            weights = transform(index, weights)
        block = arch_ops.build_block(reader.arch, reader.config, index, weights)
        del weights
        yield lambda hidden, block=block, index=index: arch_ops.run_block(block, context, index, hidden, batch_size)
        del block  # before the next block's weights are read


def stored_quantization(ctx: RunContext, block_refs: list[dict]) -> WeightsTransform:
    """Each block's weights as its stored quantization artifact makes them."""
    def transform(index: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors, meta = ctx.store.get_tensors(ref_of(block_refs[index]))
        return apply_block_artifact(weights, BlockArtifact.decode(tensors, meta["layers"]))
    return transform


def model_ends(reader: CheckpointReader) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], int]:
    """The embedding (tokens -> hidden), the LM head (final norm, head weights, softcap: hidden
    [T, H] -> logits [T, V]) and V.

    Tied embeddings: one tensor serves both ends (Gemma 3's is 671 MB in float32). Untied, the
    embedding is read when it is called (once, before the blocks) and dropped, and the head is
    read when first called (after them): neither is held while the blocks stream, nor both at
    once (a 32k x 2048 vocabulary: 262 MB each)."""
    norm = arch_ops.family_norm(reader.arch, reader.config, reader.final_norm_weight())
    softcap = getattr(reader.config, "final_logit_softcapping", None)
    head_name = reader.arch.lm_head_name
    if not reader.has(head_name):
        tied = reader.embed_weight()
        return (lambda tokens: arch_ops.embed_tokens(reader.arch, reader.config, tied, tokens),
                lambda hidden: arch_ops.head_logits(hidden, norm, tied, softcap), int(tied.shape[0]))
    loaded: list[torch.Tensor] = []

    def head(hidden: torch.Tensor) -> torch.Tensor:
        if not loaded:
            loaded.append(reader.lm_head_weight())
        return arch_ops.head_logits(hidden, norm, loaded[0], softcap)

    return (lambda tokens: arch_ops.embed_tokens(reader.arch, reader.config, reader.embed_weight(), tokens),
            head, reader.shape_of(head_name)[0])


def reader_perplexity(reader: CheckpointReader, windows: torch.Tensor, transform: WeightsTransform | None = None,
                      reference: tuple[torch.Tensor, CheckpointReader] | None = None,
                      on_block: Callable[[int], None] | None = None) -> tuple[dict, torch.Tensor]:
    """Streamed perplexity of the model `reader` reads (its weights through `transform`), and
    against `reference` = (the reference's last hidden states, its reader) the divergence from it.
    Returns the summary and the last hidden states."""
    embed, head, vocab = model_ends(reader)
    reference_hidden, reference_head = None, None
    if reference is not None:
        reference_hidden, reference_reader = reference
        reference_head = head if reference_reader is reader else model_ends(reference_reader)[1]
    return stream_perplexity(windows, embed, model_blocks(reader, windows.shape[1], transform, on_block=on_block), head, vocab,
                             reference_hidden, reference_head)


def block_fingerprints(reader: CheckpointReader) -> list[str]:
    """Each block's weights fingerprint, as the quantize flow's block artifacts record it
    (`weights_fp`: the block's tensors in their stored dtype, block-relative names), one block
    read at a time. Reading and hashing the weights costs a fraction of running the blocks."""
    return [tensors_fingerprint(sorted(reader.block_weights(index, dtype=None).items())) for index in range(reader.n_blocks)]


def ends_fingerprint(reader: CheckpointReader, known: dict[str, str] | None = None) -> str:
    """Fingerprint of the model's ends (embedding, final norm, LM head): each tensor's own
    fingerprint, hashed together, so one a caller already has (`known`, by tensor name: the
    calibration's embedding fingerprint) is not computed again. Gemma 3 270M's embedding is
    671 MB: about a second of hashing each time."""
    arch = reader.arch
    known = known or {}
    names = sorted(name for name in (arch.embed_name, arch.final_norm_name, arch.lm_head_name) if reader.has(name))
    return sha256_bytes("|".join(f"{name}={known.get(name) or reader.fingerprint([name])}" for name in names).encode())


def evaluation_key(reader: CheckpointReader, variant: str, block_ids: list[str], windows: torch.Tensor,
                   reference_hidden_sha: str | None = None, extra_settings: dict | None = None, ends_fp: str | None = None) -> str:
    """Content address of an evaluation of the model `reader` reads: its blocks (`block_ids`: the
    float weights' fingerprints for "float", the quantization artifacts' sha256 for "quant"), its
    ends (`ends_fp`, computed unless given: `ends_fingerprint`) and config.json, the windows
    (content and shape), the scoring, and for a scoring against a reference, the reference's
    stored hidden states."""
    upstream = [*block_ids, ends_fp or ends_fingerprint(reader), reader.config_fingerprint()]
    if reference_hidden_sha is not None:
        upstream.append(reference_hidden_sha)
    settings = {"variant": variant, "windows": sha256_bytes(windows.numpy().tobytes()), "windows_shape": list(windows.shape),
                "scores": SCORES} | (extra_settings or {})
    return artifact_key(STAGE, CODE_VERSION, upstream, settings)


def float_evaluation(store: ArtifactStore, reader: CheckpointReader, windows: torch.Tensor, logger,
                     weights_fps: list[str] | None = None, need_hidden: bool = False,
                     ends_fp: str | None = None) -> tuple[dict, torch.Tensor | None, int]:
    """The float model's streamed evaluation on `windows`, read from the store when it has it,
    else computed and stored: the summary (perplexity, per-window NLL sums; "hidden": the stored
    last hidden states' ref) as JSON, the last hidden states [W, L, H] float32 as safetensors.

    `weights_fps`: the blocks' weight fingerprints when the caller has them (the quantize flow's
    block artifacts record them), else read from the checkpoint; `ends_fp` likewise. Returns the
    summary, the last hidden states (read back from the store on a hit only if `need_hidden`) and
    how many blocks this call ran (0: the store had it all). Memory: the hidden states are
    W x L x H x 4 bytes (Gemma 3 270M, 6 x 2048 x 640: 31 MB; 40 windows: 210 MB), next to one
    block's weights."""
    key = evaluation_key(reader, "float", block_fingerprints(reader) if weights_fps is None else weights_fps, windows, ends_fp=ends_fp)
    hit = cached(store, STAGE, key, logger)
    hidden_hit = None if hit is None else cached(store, HIDDEN_STAGE, key, logger)
    if hit is not None and hidden_hit is not None:
        result = store.get_json(hit)
        hidden = store.get_tensors(hidden_hit)[0]["hidden"] if need_hidden else None
        logger.info("float model %s: evaluation on %d windows read from the store (%s), no block run", reader.model_dir.name,
                    windows.shape[0], key[:12])
        return result, hidden, 0
    ran: list[int] = []
    result, hidden = reader_perplexity(reader, windows, on_block=ran.append)
    result.update({"variant": "float", "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])})
    result["hidden"] = store.put_tensors(HIDDEN_STAGE, key, {"hidden": hidden.contiguous()}).to_dict()
    store.put_json(STAGE, key, result)
    logger.info("float model %s: evaluated on %d windows (%d blocks run), stored as %s", reader.model_dir.name, windows.shape[0],
                len(ran), key[:12])
    return result, hidden, len(ran)


def model_perplexity(ctx: RunContext, windows, block_refs: list[dict] | None) -> dict:
    """Streamed perplexity of the float model (block_refs None) or of the quantized one."""
    if runs_as_runtime_model(ctx):
        return runtime_perplexity(ctx, windows, block_refs)
    transform = None if block_refs is None else stored_quantization(ctx, block_refs)
    return reader_perplexity(ctx.reader, windows, transform)[0]


def compare_models(reader: CheckpointReader, baseline: CheckpointReader, windows: torch.Tensor,
                   store: ArtifactStore | None = None, logger=None) -> dict:
    """The model `reader` reads against `baseline`, on the same windows: the baseline's last
    hidden states first (with a `store`: its stored float evaluation, shared with quantize runs
    of that model, computed and stored when absent; without one, a streamed pass), then the
    model's streamed pass, scored side by side with them. "baseline_pass" says what the
    baseline's part took: blocks run (0 when the store had it) and seconds."""
    started = time.perf_counter()
    if store is None:
        ran: list[int] = []
        _, baseline_hidden = reader_perplexity(baseline, windows, on_block=ran.append)
        blocks_run = len(ran)
    else:
        _, baseline_hidden, blocks_run = float_evaluation(store, baseline, windows, logger or logging.getLogger(__name__),
                                                          need_hidden=True)
    baseline_pass = {"blocks_run": blocks_run, "from_store": store is not None and blocks_run == 0,
                     "seconds": round(time.perf_counter() - started, 3)}
    return reader_perplexity(reader, windows, reference=(baseline_hidden, baseline))[0] | {"baseline_pass": baseline_pass}


def runs_as_runtime_model(ctx: RunContext) -> bool:
    """Activation/KV quantization, rotation or a float prompt cache: the model is evaluated as it
    runs (RuntimeModel), without the float-reference divergence of weight-only runs."""
    runtime = ctx.config.runtime_quant()
    return bool(runtime.enabled or runtime.prompt_kv_tokens)


def runtime_perplexity(ctx: RunContext, windows, block_refs: list[dict] | None, batch_size: int = 8,
                       prompt_cache: bool = True) -> dict:
    """The quantized model exactly as it runs (rotated weights, online rotations, fake-quantized
    activations and KV cache), or the float model (block_refs None); with prompt_kv_tokens, only
    the continuations after the prompt (shared, or each window's own) are scored, and
    `prompt_cache` False measures the same model with the prompt's cache quantized like the rest
    (what the float prompt cache is judged against)."""
    reader, cfg = ctx.reader, ctx.config
    settings = cfg.runtime_quant() if block_refs is not None else RuntimeQuant()
    if not prompt_cache:
        settings = replace(settings, prompt_kv_tokens=0)
    model = RuntimeModel.plan(reader.arch, reader.config, settings, tied_embeddings=not reader.has(reader.arch.lm_head_name))

    # the float block the prompt pass read (it runs first), handed on to block_weights and dropped
    # there: each block is read and rotated once, and no float copy outlives its quantized pass
    prompt_block: dict[int, dict] = {}

    def float_weights(index: int) -> dict:
        prompt_block.clear()
        prompt_block[index] = model.block_weights(reader.block_weights(index))
        return prompt_block[index]

    def block_weights(index: int):
        weights = prompt_block.pop(index, None)
        if weights is None:
            weights = model.block_weights(reader.block_weights(index))
        if block_refs is not None:
            tensors, meta = ctx.store.get_tensors(ref_of(block_refs[index]))
            weights = apply_block_artifact(weights, BlockArtifact.decode(tensors, meta["layers"]))
        return weights

    embed = reader.embed_weight()
    head = reader.lm_head_weight() if reader.has(reader.arch.lm_head_name) else embed  # tied: one tensor, as above
    # the prompt's cache comes from the float blocks (the prompt-precision cache; each window's own
    # when the windows do not share one, --prompt-kv-eval own-context)
    return model.perplexity(windows, reader.n_blocks, block_weights, embed, reader.final_norm_weight(), head,
                            score_from=cfg.prompt_kv_tokens, batch_size=batch_size, between_blocks=raise_if_cancelled,
                            float_block_weights=None if block_refs is None or not prompt_cache else float_weights)


@task(name="evaluate", task_run_name="validate / {variant} perplexity", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=retry_transient)
def evaluate(config: dict, variant: str, blocks: list[dict], text_index: int = 0, reference: dict | None = None,
             embed_fp: str | None = None) -> dict:
    """variant "float": the original model (its last hidden states are stored, under "hidden");
    "quant": with each block's stored quantization, scored against `reference` (the float
    evaluation's result on the same text) when given. `text_index`: which evaluation text.
    `embed_fp`: the embedding's fingerprint when the caller has it (the calibration's). The
    result carries "ends_fp" (reused from `reference`, so the model's ends are hashed once per
    run) and "timing": this call's seconds, a cached result's lookup included."""
    return _timed_evaluation(config, variant, blocks, text_index, reference, embed_fp)


@task(name="evaluate-prompt-cache", task_run_name="validate / whole cache quantized", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=retry_transient)
def evaluate_prompt_cache(config: dict, blocks: list[dict], with_cache: dict, embed_fp: str | None = None) -> dict:
    """A run with prompt_kv_tokens: the report's "prompt_cache". `with_cache` is the "quant"
    evaluation of the headline text (the prompt's cache from the float model, kept float); this
    evaluates the same quantized model with its whole cache quantized on the same windows and
    compares the two ("paired": their ratio with the 95% interval from the per-window differences)."""
    whole = _timed_evaluation(config, "quant-whole-cache", blocks, 0, None, embed_fp)
    paired = paired_ratio(whole["window_nll"], with_cache["window_nll"], with_cache["window_tokens"])
    return {"prompt_kv_tokens": config["prompt_kv_tokens"], "prompts": config["prompt_kv_eval"], "ppl_prompt_cache": with_cache["ppl"],
            "ppl_whole_cache_quantized": whole["ppl"], "paired": {key: paired[key] for key in ("ratio", "low", "high")},
            "timing": whole["timing"]}


def _timed_evaluation(config: dict, variant: str, blocks: list[dict], text_index: int, reference: dict | None,
                      embed_fp: str | None) -> dict:
    started = time.perf_counter()
    release_free_memory()  # the last block's freed buffers: the streamed model starts from live memory
    logger = get_run_logger()
    ctx = RunContext.open(config)
    windows = eval_windows(ctx, text_index)
    ends_fp = (reference or {}).get("ends_fp") or ends_fingerprint(ctx.reader, {ctx.reader.arch.embed_name: embed_fp} if embed_fp else None)
    result = _evaluate(ctx, variant, blocks, windows, reference, ends_fp, logger)
    # not stored: the time split of this call, and the fingerprint for the next evaluation
    return result | {"ends_fp": ends_fp, "timing": {"evaluation": round(time.perf_counter() - started, 3)}}


def _evaluate(ctx: RunContext, variant: str, blocks: list[dict], windows: torch.Tensor, reference: dict | None, ends_fp: str,
              logger) -> dict:
    """variant "float", "quant" (see `evaluate`) or "quant-whole-cache" (runs with prompt_kv_tokens:
    the quantized model with the prompt's cache quantized like the rest)."""
    as_runtime = runs_as_runtime_model(ctx)
    if variant == "float" and not as_runtime:
        # the float pass keeps its last hidden states: shared with every later evaluation of the
        # same float model on these windows (`layerquant eval --baseline` included)
        result, _, blocks_run = float_evaluation(ctx.store, ctx.reader, windows, logger, [ref_of(b["block"]).meta["weights_fp"] for b in blocks],
                                                 ends_fp=ends_fp)
        logger.info("float perplexity %.4f%s", result["ppl"], " (cached)" if blocks_run == 0 else "")
        return result
    settings = {}
    if variant == "float":  # run as a RuntimeModel: its own result, never taken for the plain pass's (which has hidden states)
        block_ids = [ref_of(b["block"]).meta["weights_fp"] for b in blocks]
        settings["evaluated_as"] = "runtime-model"
    else:
        block_ids = [ref_of(b["block"]).sha256 for b in blocks]
    quantized = variant != "float"
    runtime = ctx.config.runtime_quant().identity()
    if quantized and runtime:  # absent when off: weight-only runs keep their keys
        settings["runtime_quant"] = runtime
    if ctx.config.prompt_kv_tokens:
        settings["score_from"] = ctx.config.prompt_kv_tokens
        if quantized:  # the prompt's cache is the float model's (older results kept the quantized model's), or quantized
            settings["prompt_cache"] = "float-model" if variant == "quant" else "quantized"
    # a float result of a run-time model keeps no hidden states
    reference_sha = reference["hidden"]["sha256"] if reference is not None and "hidden" in reference else None
    key = evaluation_key(ctx.reader, variant, block_ids, windows, reference_sha, settings, ends_fp=ends_fp)
    hit = cached(ctx.store, STAGE, key, logger)
    if hit is not None:
        result = ctx.store.get_json(hit)
        logger.info("%s perplexity %.4f (cached)", variant, result["ppl"])
        return result
    if as_runtime:
        result = runtime_perplexity(ctx, windows, [b["block"] for b in blocks] if quantized else None,
                                    prompt_cache=variant != "quant-whole-cache")
    else:
        reference_pair = None
        if reference_sha is not None:
            tensors, _ = ctx.store.get_tensors(ref_of(reference["hidden"]))
            reference_pair = (tensors["hidden"], ctx.reader)
        result, _ = reader_perplexity(ctx.reader, windows, stored_quantization(ctx, [b["block"] for b in blocks]), reference_pair)
    result.update({"variant": variant, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])})
    ctx.store.put_json(STAGE, key, result)
    logger.info("%s perplexity %.4f on %d windows x %d tokens", variant, result["ppl"], windows.shape[0], windows.shape[1])
    if "kl_mean" in result:
        logger.info("%s KL from float %.5f (p99 %.5f), top-1 agreement %.4f", variant, result["kl_mean"], result["kl_p99"],
                    result["top1_agreement"])
    return result
