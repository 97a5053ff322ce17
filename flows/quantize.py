"""The quantize flow: calibration -> per block reconstruction -> validation -> export.

Only wiring lives here: every stage is a task that reads and writes the artifact store and
returns small references, so a re-run finds finished work in the store and skips it.
"""
from __future__ import annotations

import resource
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from layerquant.cancellation import raise_if_cancelled
from layerquant.config import RunConfig
from layerquant.errors import Cancelled, QualityGateFailed
from layerquant.flows.cluster import Cluster, open_cluster
from layerquant.infra.checkpoint import CheckpointReader
from layerquant.infra.store import open_store
from layerquant.report import build_report, evaluation_markdown, forwards_per_block, merge_timings, timing_summary
from layerquant.specs import ArtifactRef
from layerquant.tasks.blocks import quantize_block
from layerquant.tasks.calibration import capture_calibration
from layerquant.tasks.export import export_dequantized
from layerquant.tasks.manifest import record_manifest
from layerquant.tasks.pack import pack_model
from layerquant.tasks.planning import block_specs, check_settings, fit_higgs, plan_bits, replan_for_gate, score_block
from layerquant.tasks.progress import BlockProgress
from layerquant.tasks.shards import assemble_block, plan_shards, shard_finish, shard_stage, solve_unit_task
from layerquant.tasks.validation import evaluate, evaluate_prompt_cache


def run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config", {})
    model = str(config.get("model", "model")).rstrip("/").rsplit("/", 1)[-1]
    return f"quantize {model} w{config.get('bits', '?')} g{config.get('group_size', '?')} {config.get('method', '')}"


@flow(name="layerquant-quantize", flow_run_name=run_name, persist_result=False, log_prints=False)
def quantize_flow(config: dict[str, Any], force_blocks: list[int] | None = None) -> dict[str, Any]:
    """Quantize a model; `force_blocks` are recomputed even if the store has them (with
    everything downstream of them, which their new outputs feed)."""
    started = time.perf_counter()
    logger = get_run_logger()
    run_config = RunConfig(**config)
    config = run_config.model_dump()
    reader = CheckpointReader(run_config.model)
    n_blocks = reader.n_blocks
    run_id = run_config.run_id()
    logger.info("run %s: %d blocks of %s, store %s", run_id, n_blocks, reader.arch.model_type, open_store(run_config.store).describe())
    check_settings(config)
    record_manifest(run_config.store, run_id, "running", run_manifest(config, n_blocks))
    progress = BlockProgress(run_id, n_blocks)
    state: dict[str, Any] = {}  # block results and scores finished so far: a failed run's manifest keeps them

    try:
        with open_cluster(run_config) as cluster:
            report = _run_stages(config, run_config, reader, run_id, progress, force_blocks, started, state, cluster)
    except (Exception, TerminationSignal) as exc:
        # the manifest says what failed; finished blocks (and scores) stay in the store for the retry.
        # A deployment run cancelled from the UI or API gets SIGTERM from its worker, which Prefect
        # raises as TerminationSignal wherever the flow is (a BaseException: caught here by name)
        status = "cancelled" if isinstance(exc, (Cancelled, TerminationSignal)) else "failed"
        failure = run_manifest(config, n_blocks, state.get("blocks"), state.get("scored"), error=f"{type(exc).__name__}: {exc}")
        if getattr(exc, "report", None) is not None:
            failure["report"] = exc.report
        record_manifest(run_config.store, run_id, status, failure)
        raise
    finally:
        progress.close()
    return report


def run_manifest(config: dict, n_blocks: int, blocks: list[dict] | None = None, scored: list[dict] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The body of the run's manifest: config and size, then what has finished so far."""
    manifest: dict[str, Any] = {"config": config, "n_blocks": n_blocks}
    if blocks is not None:
        manifest["blocks"] = [b["block"] for b in blocks]
    if scored is not None:
        manifest["scores"] = [s["scores"] for s in scored]
    return manifest | extra


def _run_stages(config, run_config, reader, run_id, progress, force_blocks, started, state, cluster: Cluster | None) -> dict[str, Any]:
    n_blocks = reader.n_blocks
    first_forced = min(force_blocks) if force_blocks else n_blocks
    raise_if_cancelled()
    # round-to-nearest alone needs no samples: no calibration, no block forwards
    calibration = capture_calibration(config) if run_config.needs_calibration() else None
    plan, scored = None, []
    if run_config.budget is not None:
        # pass 1 on the float model: scores for every (layer, candidate), then one integer program
        inputs = calibration
        for index in range(n_blocks):
            raise_if_cancelled()
            scored.append(score_block(config, index, inputs))
            inputs = scored[-1]["outputs"]
        # recorded before planning: `layerquant plan` can re-solve from them whatever happens next
        state["scored"] = scored
        record_manifest(run_config.store, run_id, "running", run_manifest(config, n_blocks, scored=scored))
        plan = plan_bits(config, [s["scores"] for s in scored], run_config.budget)
    inputs = calibration
    blocks: list[dict] = []
    gate_events: list[dict] = []
    used_specs: dict[str, dict] = {}  # full layer name -> the spec its finished block used
    for index in range(n_blocks):
        raise_if_cancelled()
        specs = block_specs(config, index, plan["plan"] if plan else None)
        if cluster is not None:
            result = quantize_block_on_cluster(cluster, config, index, inputs, specs, force=index >= first_forced)
        else:
            result = quantize_block(config, index, inputs, specs, force=index >= first_forced)
        if run_config.gate_output_error is not None:
            result, specs, plan, events = enforce_output_gate(config, run_config.gate_output_error, index, inputs, specs, result, plan,
                                                              [s["scores"] for s in scored], used_specs)
            gate_events += events
        used_specs |= {reader.block_prefix(index) + name: spec for name, spec in specs.items()}
        blocks.append(result)
        inputs = result["outputs"]
        progress.advance(f"block {index:02d}{' (cached)' if result['cached'] else ''}")
        state["blocks"] = blocks
        record_manifest(run_config.store, run_id, "running", run_manifest(config, n_blocks, blocks, scored))

    evaluations = {}
    # the calibration hashed the embedding already: the evaluations' keys reuse its fingerprint
    embed_fp = None if calibration is None else calibration["meta"].get("embed_fp")
    for text_index, text_name in enumerate(run_config.eval_names()):
        raise_if_cancelled()
        float_result = evaluate(config, "float", blocks, text_index, embed_fp=embed_fp)
        raise_if_cancelled()
        # scored next to the float model's stored last hidden states (when it keeps them): KL, top-1
        evaluations[text_name] = (float_result, evaluate(config, "quant", blocks, text_index, float_result))
    raise_if_cancelled()
    ppl_fp, ppl_quant = next(iter(evaluations.values()))  # the first text is the headline
    # the float prompt cache judged on the headline text: the same model with the prompt quantized too
    prompt_cache = evaluate_prompt_cache(config, blocks, ppl_quant, embed_fp=embed_fp) if run_config.prompt_kv_tokens else None
    prompt_cache_timing = [prompt_cache.pop("timing")] if prompt_cache is not None else []
    raise_if_cancelled()
    if plan is not None:
        plan = plan | fit_higgs(config, ppl_fp["ppl"], plan["predicted_loss"])
    metas = [ArtifactRef.from_dict(b["block"]).meta for b in blocks]
    wall_s = time.perf_counter() - started
    task_timings = ([calibration["timing"]] if calibration is not None else []) + [b["timing"] for b in blocks] \
        + [s.get("timing", {}) for s in scored] + [result["timing"] for pair in evaluations.values() for result in pair] \
        + prompt_cache_timing
    report = build_report(
        metas,
        [reader.block_prefix(i) for i in range(n_blocks)],
        ppl_fp,
        ppl_quant,
        {
            "run_id": run_id,
            "model": run_config.model,
            "model_type": reader.arch.model_type,
            "n_blocks": n_blocks,
            "config": run_config.identity(),
            "blocks_cached": [i for i, b in enumerate(blocks) if b["cached"]],
            "plan": None if plan is None else {k: plan[k] for k in ("avg_bits", "predicted_loss", "predicted_ppl", "higgs", "solve_s")}
            | {"budget": run_config.budget},
            "gates": gate_events,
            "wall_s": round(wall_s, 2),
            "timing": timing_summary(task_timings, wall_s),
            "forwards_per_block": forwards_per_block(metas),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "cluster": None if cluster is None else {
                "shards": cluster.n_shards, "workers": sorted({w for b in blocks for w in b.get("workers", [])}),
                "rebuilt_shard_tasks": sum(b.get("rebuilt", 0) for b in blocks),
                # shard Gram sums and solved units discarded once their block was assembled
                "pruned_intermediates": sum(b.get("pruned", 0) for b in blocks),
                # per worker and block: peak and idle RSS (MB), what bounds a worker's memory
                "worker_memory": [b.get("worker_memory", {}) for b in blocks]},
        },
        evaluations,
    )
    if prompt_cache is not None:
        report["prompt_cache"] = prompt_cache
    if run_config.max_ppl_increase is not None and report["ppl_quant"] > report["ppl_fp"] * (1 + run_config.max_ppl_increase):
        error = QualityGateFailed(report["ppl_fp"], report["ppl_quant"], run_config.max_ppl_increase)
        error.report = report  # the manifest keeps what was measured
        raise error
    if run_config.out and run_config.pack_format == "dequantized":
        export_dequantized(config, blocks, report)
    elif run_config.out:
        pack_model(config, blocks, report, run_config.pack_format, run_config.out)
    publish_summary(run_id, report)
    record_manifest(run_config.store, run_id, "completed", run_manifest(config, n_blocks, blocks, scored, report=report))
    return report


def quantize_block_on_cluster(cluster: Cluster, config: dict, index: int, inputs: dict, specs: dict, force: bool) -> dict:
    """Block `index` over the cluster's shards: per linear group, every shard runs to the
    group's input (in parallel, each on its worker), then the group's solve units are solved
    (in parallel) from the merged shard sums; then the shards run to the block's end. The same
    result (and artifact bytes) as `quantize_block`."""
    started = time.perf_counter()
    plan = plan_shards(config, index, inputs, specs, cluster.n_shards, force=force)
    if plan["cached"] is not None:
        return plan["cached"]
    placement = cluster.placement()
    shards = range(plan["n_shards"])
    solved: list[list[dict]] = []
    stages: list[list[dict]] = []
    for stage, units in enumerate(plan["units"]):
        raise_if_cancelled()
        partials = cluster.gather([(shard_stage, placement[s], dict(config=config, plan=plan, shard=s, stage=stage, solved=solved))
                                   for s in shards])
        stages.append(partials)
        # a unit's row chunks in as many tasks as there are workers (a few large units would
        # otherwise be solved one at a time while the other workers wait)
        solves = [(unit, rows) for unit, chunks in zip(units, plan["chunks"][stage]) for rows in cluster.spread(chunks)]
        solved.append(cluster.gather([(solve_unit_task, None, dict(config=config, plan=plan, stage=stage, unit=unit, partials=partials,
                                                                   label="+".join(unit) + (f" rows {rows[0]}-{rows[1]}" if rows else ""),
                                                                   rows=rows)) for unit, rows in solves]))
    finished = cluster.gather([(shard_finish, placement[s], dict(config=config, plan=plan, shard=s, solved=solved)) for s in shards])
    return assemble_block(config, plan, solved, finished, stages, time.perf_counter() - started)


def block_output_error(result: dict) -> float:
    return ArtifactRef.from_dict(result["block"]).meta["output_error"]


def enforce_output_gate(config, threshold, index, inputs, specs, result, plan, score_refs, used_specs):
    """Redo block `index` with finer specs (chosen by the gate task) while its output error
    exceeds `threshold`. Returns (block result, its specs, the plan now in force, what happened)."""
    logger = get_run_logger()
    events = []
    while (error := block_output_error(result)) > threshold:
        event = {"block": index, "output_error": error, "threshold": threshold}
        step = replan_for_gate(config, index, result["block"], specs, plan, score_refs, used_specs)
        if step["action"] == "kept":
            events.append(event | {"action": "kept", "why": step["why"]})
            break
        plan = step["plan"]
        logger.warning("block %02d: output error %.3e over the gate %.3e, redoing it with finer grids", index, error, threshold)
        redone = quantize_block(config, index, inputs, step["specs"])
        result = redone | {"timing": merge_timings(result["timing"], redone["timing"])}  # both attempts took time
        events.append(event | {"action": "redone", "output_error_after": block_output_error(result),
                               "specs_before": step["labels_before"], "specs_after": step["labels_after"]})
        specs = step["specs"]
    return result, specs, plan, events


def prompt_cache_markdown(comparison: dict | None) -> str:
    if comparison is None:
        return ""
    paired = comparison["paired"]
    return (f"## Float prompt cache\n\nContinuations after {comparison['prompt_kv_tokens']}-token prompts ({comparison['prompts']}): "
            f"perplexity {comparison['ppl_prompt_cache']:.4f} with the prompt's cache from the float model, "
            f"{comparison['ppl_whole_cache_quantized']:.4f} with the whole cache quantized; ratio {paired['ratio']:.4f} "
            f"[{paired['low']:.4f}, {paired['high']:.4f}] (paired 95% interval over the windows).\n\n")


def publish_summary(run_id: str, report: dict[str, Any]) -> None:
    """What a person watching the Prefect UI wants: the plan and errors, and the headline."""
    create_table_artifact(
        key=f"layers-{run_id}",
        table=[{k: layer[k] for k in ("name", "method", "bits", "group_size", "bits_per_weight", "error")} for layer in report["layers"]],
        description="per-layer plan and relative Hessian-weighted error",
    )
    create_markdown_artifact(
        key=f"summary-{run_id}",
        markdown=(
            f"# layerquant run {run_id}\n\n| | value |\n|---|---|\n"
            f"| model | {report['model']} |\n| float perplexity | {report['ppl_fp']:.4f} |\n"
            f"| quantized perplexity | {report['ppl_quant']:.4f} ({report['ppl_increase_pct']:+.2f}%) |\n"
            f"| average bits / weight | {report['avg_bits']:.3f} |\n| quantized size | {report['quantized_mb']:.2f} MiB |\n"
            f"| wall time | {report['wall_s']} s |\n| peak RSS | {report['peak_rss_mb']} MB |\n"
            f"| block forwards per block | {report['forwards_per_block']} |\n\n"
            + prompt_cache_markdown(report.get("prompt_cache"))
            + evaluation_markdown(report) +
            "## Where the time went\n\n| phase | seconds | share |\n|---|---|---|\n"
            + "".join(f"| {name} | {seconds} | {100 * report['timing']['share'][name]:.1f}% |\n"
                      for name, seconds in report["timing"]["seconds"].items())
        ),
        description="float vs quantized",
    )
