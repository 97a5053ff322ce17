"""The `layerquant` command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from layerquant.errors import LayerquantError

log = logging.getLogger("layerquant")


def prefect_environment() -> None:
    """Defaults that make Prefect's ephemeral mode work offline on a small machine."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the ephemeral API server needs 13-20 s to start on 2 cores, past Prefect's 20 s default
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are left to the user: local folders never touch the
    # network, and a hub model (--model org/name) is taken from the cache before any download
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_default(name: str):
    """RunConfig's default for one setting: help texts and flags show it, never a copy of it.
    (Run flags themselves default to None, which leaves the setting to RunConfig.)"""
    from layerquant.config import RunConfig

    return RunConfig.model_fields[name].default


def on_off(value: bool) -> str:
    return "on" if value else "off"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder, or a Hugging Face Hub id org/name (its cache first, downloaded if online; "
                                        "default: the bundled stories260K)")
    parser.add_argument("--revision", help="with --model org/name: a branch, tag or commit (default main)")
    parser.add_argument("--recipe", help="YAML recipe; flags override it")
    parser.add_argument("--calib", help="calibration text: a .txt file, a datasets folder, json:FILE, text:FILE, "
                                        "or a hub dataset org/name[:config[:split]] (cached, or downloaded when online)")
    parser.add_argument("--eval", dest="eval_text", action="append",
                        help="evaluation text (same forms as --calib); repeat for several, each reported under its name "
                             "(the first is the headline, used by quality gates and the bit plan's fit)")
    parser.add_argument("--text-column", help="the dataset column read as text (default text; a chat `messages` column is "
                                              "rendered with the tokenizer's chat template)")
    parser.add_argument("--text-encoding", help="encoding of the .txt texts (default utf-8; e.g. latin-1)")
    parser.add_argument("--bits", type=int)
    parser.add_argument("--group-size", type=group_size_arg,
                        help="columns per scale; 0 = per-channel; auto = chosen per matrix from its weights")
    parser.add_argument("--asym", action="store_true", default=None, help="asymmetric grid (default symmetric)")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                        help=f"GPTQ column order by Hessian diagonal, static groups (default {on_off(run_default('act_order'))})")
    parser.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                        help=f"search a clipped grid range per group (default {on_off(run_default('clip_search'))})")
    parser.add_argument("--method", choices=["rtn", "gptq", "pbllm"])
    parser.add_argument("--nsamples", type=int)
    parser.add_argument("--seqlen", type=int)
    parser.add_argument("--calib-selection", choices=["first", "random"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--eval-windows", type=int)
    parser.add_argument("--eval-seqlen", type=int)
    parser.add_argument("--budget", type=float, help="mixed precision: average bits per weight, overhead counted")
    parser.add_argument("--salient-fraction", type=float, help=f"PB-LLM: share of weights kept in salient_bits (default {run_default('salient_fraction')})")
    parser.add_argument("--refine-steps", type=int, help=f"AdaQuant scale refinement steps per block (default {run_default('refine_steps')}; 0 = off)")
    parser.add_argument("--lowrank-rank", type=int,
                        help="with --refine-steps: a rank-R correction per quantized linear trained with the scales (float16 "
                             "factors, counted in avg_bits; written folded into a dequantized model, no packed format). Default 0 = off")
    parser.add_argument("--act-clip", action=argparse.BooleanOptionalAction, default=None,
                        help="with --act-bits and --refine-steps: train one activation clipping ratio per quantized input with the scales")
    parser.add_argument("--norm-tweak-steps", type=int, help=f"norm tweaking steps per block (default {run_default('norm_tweak_steps')}; 0 = off)")
    parser.add_argument("--tuning-space", choices=["residual", "next_norm"],
                        help="where tuning compares block outputs: as they are (residual), or after the next block's input norm "
                             f"(next_norm); default {run_default('tuning_space')}")
    parser.add_argument("--gate-output-error", type=float,
                        help="redo a block with a more generous spec when its relative output error exceeds this")
    parser.add_argument("--max-ppl-increase", type=float, help="fail the run if perplexity rises by more than this fraction (0.05 = +5%%)")
    parser.add_argument("--pack-format", choices=["dequantized", "compressed-tensors", "gptq"],
                        help=f"what --out receives (default {run_default('pack_format')}, what vLLM and transformers + compressed-tensors "
                             "load; dequantized: float weights any transformers loads)")
    parser.add_argument("--store", help=f"artifact store: a folder or s3://bucket/prefix (default {run_default('store')})")
    parser.add_argument("--act-bits", type=int, choices=[3, 4, 8, 16],
                        help="per-token dynamic symmetric activations at every quantized linear's input (default 16 = float)")
    parser.add_argument("--act-group-size", type=int, help="input channels per activation scale (default 0 = one per token)")
    parser.add_argument("--kv-bits", type=int, choices=[3, 4, 8, 16], help="KV cache per head and token (default 16 = float)")
    parser.add_argument("--kv-group-size", type=int, help="head channels per KV scale (default 0 = one per head and token)")
    parser.add_argument("--prompt-kv-tokens", type=int, metavar="P", help="the shared prompt: the first P tokens' keys and values computed by the float model and kept float; evaluation scores the continuations after it (default 0)")
    parser.add_argument("--prompt-kv-eval", choices=["shared-prompt", "own-context"],
                        help="with --prompt-kv-tokens, what the validation scores: continuations after one shared prompt (the "
                             "text's first tokens; default), or each after its own preceding text, kept as the float model's cache")
    parser.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                        help="QuaRot Hadamard rotations folded into the weights (+ online at down_proj and the cached keys)")
    parser.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=None,
                        help="SmoothQuant scale migration (alpha 0.5) folded into norms and weights: the alternative to --rotate")
    parser.add_argument("--token-clip-search", action=argparse.BooleanOptionalAction, default=None,
                        help="with --act-bits or --kv-bits 3 or 4: round each token (group, cache entry) with the clipped scale of "
                             "least squared error, searched from 1.0 to 0.6 of its range as it is quantized")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"],
                        help=f"where blocks are reconstructed (default {run_default('device')}; auto = CUDA when present)")
    parser.add_argument("--workers", type=int,
                        help="run the blocks' calibration shards on a local Dask cluster of this many worker processes")
    parser.add_argument("--threads-per-worker", type=int, help="torch threads of each local worker (default 1)")
    parser.add_argument("--dask-address", help="run on an existing Dask cluster: its scheduler, e.g. tcp://host:8786")
    parser.add_argument("--shards", type=int,
                        help="calibration shards, a power of two (default: the worker count rounded up to one)")


def group_size_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a group size: use an integer (0 = per-channel) or auto") from None


def absolute_location(location: str | None) -> str | None:
    """Local paths become absolute (the run's manifest must stay valid from any directory)."""
    if location is None or location.startswith("s3://"):
        return location
    return str(Path(location).expanduser().resolve())


def config_from_args(args: argparse.Namespace):
    from layerquant.config import RunConfig
    from layerquant.infra.hub import resolve_model

    config = RunConfig.from_sources(
        args.recipe,
        model=args.model,
        calib=args.calib,
        eval=args.eval_text if args.eval_text is None or len(args.eval_text) > 1 else args.eval_text[0],
        text_encoding=args.text_encoding,
        text_column=args.text_column,
        device=getattr(args, "device", None),
        bits=args.bits,
        group_size=None if args.group_size == "auto" else args.group_size,
        granularity="auto" if args.group_size == "auto" else None,
        sym=False if args.asym else None,
        act_order=args.act_order,
        clip_search=args.clip_search,
        method=args.method,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        calib_selection=args.calib_selection,
        seed=args.seed,
        eval_windows=args.eval_windows,
        eval_seqlen=args.eval_seqlen,
        pack_format=args.pack_format,
        budget=args.budget,
        salient_fraction=args.salient_fraction,
        refine_steps=args.refine_steps,
        lowrank_rank=getattr(args, "lowrank_rank", None),
        act_clip=getattr(args, "act_clip", None),
        norm_tweak_steps=args.norm_tweak_steps,
        tuning_space=args.tuning_space,
        gate_output_error=args.gate_output_error,
        max_ppl_increase=args.max_ppl_increase,
        act_bits=getattr(args, "act_bits", None),
        act_group_size=getattr(args, "act_group_size", None),
        kv_bits=getattr(args, "kv_bits", None),
        kv_group_size=getattr(args, "kv_group_size", None),
        prompt_kv_tokens=getattr(args, "prompt_kv_tokens", None),
        prompt_kv_eval=getattr(args, "prompt_kv_eval", None),
        rotate=getattr(args, "rotate", None),
        smooth=getattr(args, "smooth", None),
        token_clip_search=getattr(args, "token_clip_search", None),
        store=absolute_location(args.store or run_default("store")),
        out=absolute_location(getattr(args, "out", None)),
        workers=getattr(args, "workers", None),
        threads_per_worker=getattr(args, "threads_per_worker", None),
        dask_address=getattr(args, "dask_address", None),
        shards=getattr(args, "shards", None),
    )
    # a hub id (flag or recipe) becomes its snapshot folder in the hub cache, fetched if need be
    return config.model_copy(update={"model": resolve_model(config.model, args.revision)})


def protected_paths(config) -> list[tuple[str, str]]:
    """What an output folder must stay clear of (infra.paths.check_output_folder)."""
    from layerquant.infra.texts import text_source_file

    return [("artifact store", config.store), ("model folder", config.model), ("calibration text", text_source_file(config.calib)),
            *(("evaluation text", text_source_file(text)) for text in config.eval_texts())]


def check_output(config, out: str | None, args: argparse.Namespace) -> None:
    from layerquant.infra.paths import check_output_folder

    if out:
        check_output_folder(out, overwrite=getattr(args, "overwrite", False), force=getattr(args, "force", False),
                            protected=protected_paths(config))


def preflight(config) -> None:
    """Cheap checks before Prefect starts, so bad input fails in a second with one clear line.
    The texts' token windows land in the store: the run's tasks read them back instead of
    tokenizing again."""
    from layerquant.infra.checkpoint import CheckpointReader
    from layerquant.infra.store import open_store
    from layerquant.tasks.planning import check_budget, check_overrides
    from layerquant.tasks.token_windows import all_token_windows

    config.check_cluster_support()
    reader = CheckpointReader(config.model)
    check_overrides(config, reader)
    if config.budget is not None:
        check_budget(config, reader)
    requests = [("calibration", 0)] if config.needs_calibration() else []
    requests += [("evaluation", index) for index in range(len(config.eval_texts()))]
    all_token_windows(open_store(config.store), config, requests)


def cmd_quantize(args: argparse.Namespace) -> int:
    from layerquant.infra.paths import check_store_location

    check_store_location(args.store)
    config = config_from_args(args)
    check_output(config, config.out, args)
    preflight(config)
    out = Path(config.out)
    from layerquant.flows.quantize import quantize_flow

    report = quantize_flow(config.model_dump())
    if report.get("status") == "cancelled":
        raise_cancelled()
    summary = {k: report[k] for k in ("run_id", "ppl_fp", "ppl_quant", "avg_bits", "wall_s", "peak_rss_mb")}
    if "prompt_cache" in report:  # --prompt-kv-tokens: what the float prompt cache changed, on the same windows
        summary["prompt_cache"] = report["prompt_cache"]
    if report["vllm_unservable"]:
        log.warning("%d layers cannot be served by vLLM (2/3-bit or PB-LLM), e.g. %s", len(report["vllm_unservable"]),
                    report["vllm_unservable"][0])
    for statement in report.get("runtime_unservable", []):
        log.warning("run-time quantization: %s", statement)
    print(json.dumps({**summary, "out": str(out)}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a model folder; with --baseline, also of the baseline on the same windows
    (its tokenizer cuts them) and the model's divergence from it: KL(baseline || model) mean and
    99th percentile, top-1 agreement, and the perplexity ratio with its paired 95% interval. The
    baseline's streamed pass is stored in --store and reused by every later comparison with it
    (and taken from a quantize run of it on the same windows): "baseline_pass" says which."""
    from layerquant.config import RunConfig
    from layerquant.infra.paths import check_store_location
    from layerquant.tasks.context import RunContext
    from layerquant.tasks.validation import compare_models, eval_windows, model_perplexity

    check_store_location(args.store)
    from layerquant.infra.hub import resolve_model

    model = resolve_model(args.model, args.revision)
    baseline = None if args.baseline is None else resolve_model(args.baseline, None)
    config = RunConfig.from_sources(None, model=baseline or model, eval=args.text, eval_windows=args.windows,
                                    eval_seqlen=args.seqlen, store=args.store, text_encoding=args.text_encoding,
                                    text_column=args.text_column)
    ctx = RunContext.open(config.model_dump())
    windows = eval_windows(ctx)
    if args.baseline is None:
        result = model_perplexity(ctx, windows, None)
    else:
        # the baseline's pass comes from the store when any run measured it there on these windows
        result = compare_models(RunContext.open(config.model_copy(update={"model": model}).model_dump()).reader, ctx.reader, windows,
                                ctx.store, log)
    print(json.dumps({"model": args.model, "baseline": args.baseline, "text": args.text, **result,
                      "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from layerquant.config import RunConfig
    from layerquant.flows.retry import load_run_config, retry_flow
    from layerquant.infra.paths import check_store_location

    check_store_location(args.store)
    args.store = absolute_location(args.store)
    manifest = load_run_config(args.store, args.run)
    n_blocks = manifest.get("n_blocks", 0)
    for block in args.block or []:
        if not 0 <= block < n_blocks:
            raise LayerquantError(f"block {block} does not exist in run {args.run}", f"choose a block in 0..{n_blocks - 1}")
    config = RunConfig(**{**manifest["config"], "store": args.store})
    out = absolute_location(args.out) or config.out
    # the earlier run's output folder is not replaced behind the user's back either
    check_output(config, out, args)
    report = retry_flow(args.run, args.store, args.block, out)
    if report.get("status") == "cancelled":
        raise_cancelled()
    print(json.dumps({k: report[k] for k in ("run_id", "ppl_fp", "ppl_quant", "avg_bits", "blocks_cached", "wall_s")}, indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Re-solve the bit plan of a run for a new budget from its stored scores: no Prefect server,
    no Hessian, seconds."""
    from layerquant.config import RunConfig
    from layerquant.flows.retry import load_run_config
    from layerquant.infra.checkpoint import CheckpointReader
    from layerquant.infra.store import open_store
    from layerquant.tasks.planning import fused_groups, higgs_coefficient, predicted_perplexity, solve_plan

    store_location = absolute_location(args.store)
    manifest = load_run_config(store_location, args.run)
    if not manifest.get("scores"):
        raise LayerquantError(f"run {args.run} has no sensitivity scores", "quantize with --budget once to compute them")
    config = RunConfig(**{**manifest["config"], "budget": args.budget, "store": store_location})
    allocation = solve_plan(config, open_store(store_location), manifest["scores"], fused_groups(CheckpointReader(config.model)))
    for row in allocation.per_layer:
        print(f"{row['name']:48s} {row['spec']:28s} {row['bits_per_weight']:6.3f} bits/w  score {row['score']:.3e}")
    store = open_store(store_location)
    calibration = higgs_coefficient(store, config)
    ppl_fp = (manifest.get("report") or {}).get("ppl_fp")
    print(json.dumps({"budget": args.budget, "avg_bits": allocation.avg_bits, "predicted_loss": allocation.predicted_loss,
                      "predicted_ppl": predicted_perplexity(ppl_fp, allocation.predicted_loss, calibration), "higgs": calibration,
                      "solve_s": round(allocation.seconds, 3), "layers": len(allocation.plan)}))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from layerquant.config import RunConfig
    from layerquant.flows.retry import load_run_config, pack_flow
    from layerquant.infra.paths import check_store_location

    check_store_location(args.store)
    store = absolute_location(args.store)
    manifest = load_run_config(store, args.run)
    check_output(RunConfig(**{**manifest["config"], "store": store}), args.out, args)
    out = pack_flow(args.run, store, args.format, absolute_location(args.out))
    print(json.dumps({"run_id": args.run, "format": args.format, "out": out}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from layerquant.flows.quantize import quantize_flow

    from layerquant.infra.paths import check_folder_path, check_store_location

    check_store_location(args.store)
    check_folder_path(args.out, "--out")
    config = config_from_args(args)
    preflight(config)
    quantize_flow.serve(name=args.name, cron=args.cron, parameters={"config": config.model_dump()})
    return 0


def add_overwrite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder of an earlier layerquant run (one with report.json)")
    parser.add_argument("--force", action="store_true",
                        help="with --overwrite: replace the folder even if it holds files layerquant did not write")


def raise_cancelled() -> None:
    from layerquant.cancellation import raise_if_cancelled

    raise_if_cancelled()
    raise LayerquantError("the run was cancelled", "re-run the same command to resume")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerquant", description="Post-training LLM quantization, block by block, on Prefect.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    quantize = sub.add_parser("quantize", help="quantize a model and report its perplexity")
    add_run_arguments(quantize)
    quantize.add_argument("--out", required=True, help="output model folder (written only if the run succeeds)")
    add_overwrite_arguments(quantize)
    quantize.set_defaults(func=cmd_quantize)

    retry = sub.add_parser("retry", help="re-run failed or chosen blocks of a run, and what depends on them")
    retry.add_argument("--run", required=True, help="run id (report.json's run_id)")
    retry.add_argument("--block", type=int, action="append", help="force this block (repeatable); default: only failed ones")
    retry.add_argument("--store", default=run_default("store"))
    retry.add_argument("--out", help="output folder (default: the run's own)")
    add_overwrite_arguments(retry)
    retry.set_defaults(func=cmd_retry)

    plan = sub.add_parser("plan", help="re-solve a run's bit plan for a new budget from its stored scores")
    plan.add_argument("--run", required=True)
    plan.add_argument("--budget", type=float, required=True)
    plan.add_argument("--store", default=run_default("store"))
    plan.set_defaults(func=cmd_plan)

    pack = sub.add_parser("pack", help="pack a finished run for inference engines (no recomputation)")
    pack.add_argument("--run", required=True)
    pack.add_argument("--format", required=True, choices=["compressed-tensors", "gptq"])
    pack.add_argument("--store", default=run_default("store"))
    pack.add_argument("--out", required=True)
    add_overwrite_arguments(pack)
    pack.set_defaults(func=cmd_pack)

    serve = sub.add_parser("serve", help="serve the quantize flow as a scheduled Prefect deployment (needs PREFECT_API_URL)")
    add_run_arguments(serve)
    serve.add_argument("--out", required=True)
    serve.add_argument("--name", default="layerquant-scheduled")
    serve.add_argument("--cron", default="0 3 * * *", help="schedule (default: daily at 03:00)")
    serve.set_defaults(func=cmd_serve)

    evaluate = sub.add_parser("eval", help="perplexity of a model folder on a text, as JSON")
    evaluate.add_argument("--model", required=True, help="model folder (any transformers loads) or a hub id org/name")
    evaluate.add_argument("--revision", help="with --model org/name: a branch, tag or commit")
    evaluate.add_argument("--text", required=True)
    evaluate.add_argument("--baseline", help="reference model folder (e.g. the float model): adds its perplexity, the KL divergence "
                                             "from it, top-1 agreement and the paired 95%% interval of the perplexity ratio")
    evaluate.add_argument("--windows", type=int, default=run_default("eval_windows"))
    evaluate.add_argument("--seqlen", type=int, default=run_default("eval_seqlen"))
    evaluate.add_argument("--store", default=run_default("store"))
    evaluate.add_argument("--text-encoding", help="encoding of a .txt text (default utf-8; e.g. latin-1)")
    evaluate.add_argument("--text-column", help="the dataset column read as text (default text)")
    evaluate.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    prefect_environment()
    from layerquant.infra.memory import tune_allocator

    tune_allocator()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # one line per HTTP call to the local Prefect API drowns the figures a person wants to see
    logging.getLogger("httpx").setLevel(logging.WARNING)
    previous_handlers, early_server = {}, None
    if args.command in ("quantize", "retry", "pack"):
        from layerquant.flows import interrupts

        previous_handlers = interrupts.install_handlers()
        interrupts.shield_ephemeral_server()
        early_server = interrupts.start_ephemeral_server_early()
        interrupts.keep_sigterm_for_cancellation()
    try:
        return run_command(args)
    finally:
        if early_server is not None:
            early_server.close()
        if args.command in ("quantize", "retry", "pack"):
            interrupts.restore_handlers(previous_handlers)
            interrupts.give_sigterm_back_to_prefect()


def run_command(args: argparse.Namespace) -> int:
    from layerquant.errors import Cancelled

    try:
        return args.func(args)
    except Cancelled as exc:
        print(f"interrupted ({signal_name(exc.signum)}): finished blocks are kept in the store; re-run the same command to resume",
              file=sys.stderr)
        return exc.exit_code
    except LayerquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished blocks are kept in the store; re-run the same command to resume", file=sys.stderr)
        return 130


def signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


if __name__ == "__main__":
    sys.exit(main())
