"""One block over a cluster: data-parallel calibration shards (solvers/sharded.py).

Per block: `plan_shards` names the work (content address, shards' samples, groups, solve
units); per group, `shard_stage` runs each shard's batches to the group's input and stores the
shard's exact-order Gram sum; `solve_unit_task` merges the sums and solves one unit; after the
last group `shard_finish` stores each shard's outputs (the next block's inputs), and
`assemble_block` writes the block artifact the rest of the pipeline reads, byte for byte the
one the single-process path writes.

Only refs and small JSON cross the wire. A shard's paused forward stays in its worker's memory
between stage tasks (the flow pins a shard's tasks to one worker); when it is not there (the
worker died, the task moved, a retry) the stage rebuilds it from the store: the shard's inputs
and the groups solved so far, then a forward to the stage. Same bits either way.
"""
from __future__ import annotations

import resource
import time
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerquant.block_artifact import BlockArtifact, LayerRecord
from layerquant.cancellation import raise_if_cancelled
from layerquant.config import CODE_VERSION
from layerquant.errors import InvalidSpec
from layerquant.infra.checkpoint import tensors_fingerprint
from layerquant.infra.memory import release_free_memory
from layerquant.infra.store import artifact_key
from layerquant.solvers.reconstruct import (ERROR_SAMPLES, UnitPiece, assemble_unit, dequantized_weights, prepare_unit, solve_chunks,
                                             solve_unit_rows, solve_units)
from layerquant.solvers.hessian import GramPanels
from layerquant.solvers.sharded import float_output_error, merged_hessian, set_weights, shard_sample_ranges, start_shard
from layerquant.solvers.staged import release_weights
from layerquant.specs import QuantSpec
from layerquant.tasks.blocks import BLOCK_STAGE, block_key
from layerquant.tasks.context import RunContext, cached, phase, ref_of, retry_transient

PARTIAL_STAGE = "hessian-partial"
UNIT_STAGE = "solved-unit"
SHARD_HIDDEN_STAGE = "hidden-shard"
BATCH_SIZE = 8  # the in-process path's batch: the summation tree's leaves must be the same batches
WEIGHT_HAT = "weight_hat"
_RETRIES = dict(cache_policy=NO_CACHE, persist_result=False, retries=3, retry_delay_seconds=[2, 5, 10],
                retry_condition_fn=retry_transient)


def _worker() -> tuple[dict, str]:
    """(this Dask worker's shard memory, its address); outside a worker an empty dict that
    nothing keeps, so every stage rebuilds its shard from the store."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return {}, "local"
    if not hasattr(worker, "layerquant_shards"):
        import psutil

        # the worker object is the one thing that lives as long as the worker process and is
        # private to it: paused forwards and next-block inputs of the shards it owns, and its
        # memory before its first shard (imports, Prefect client: what an idle worker holds)
        worker.layerquant_shards = {"idle_rss_mb": psutil.Process().memory_info().rss / 2**20}
    return worker.layerquant_shards, worker.address


def _memory_report(memory: dict) -> dict[str, float]:
    """This worker's peak RSS so far and its idle RSS (MB): what bounds a worker's memory."""
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "idle_rss_mb": round(memory.get("idle_rss_mb", 0.0), 1)}


@task(name="plan-shards", task_run_name="block-{index:02d} / plan", **_RETRIES)
def plan_shards(config: dict, index: int, inputs: dict, specs: dict[str, dict], n_shards: int, force: bool = False) -> dict:
    """What block `index` takes over `n_shards` shards, and its cached result if the store has
    it. `inputs`: the calibration ref (block 0) or the previous block's {"key", "shards"}."""
    logger = get_run_logger()
    ctx = RunContext.open(config)
    ctx.config.check_cluster_support()
    weights = ctx.reader.block_weights(index, dtype=None)
    weights_fp = tensors_fingerprint(sorted(weights.items()))
    rows_of = {name.removesuffix(".weight"): int(t.shape[0]) for name, t in weights.items() if t.dim() == 2}
    del weights
    if "shards" in inputs:
        shards = inputs["shards"]
        # the previous block's key names its outputs whatever the shard count
        inputs_id = "after:" + inputs["key"]
    else:
        n_samples = int(inputs["meta"]["nsamples"])
        shards = [{"ref": inputs, "start": a, "stop": b} for a, b in shard_sample_ranges(n_samples, BATCH_SIZE, n_shards)]
        inputs_id = ref_of(inputs).sha256  # as the single-process path keys block 0
    if len(shards) != n_shards:
        raise InvalidSpec(f"block {index} gets {len(shards)} input shards for {n_shards} shards",
                          "keep the shard count of a run fixed, or re-run it from its first block")
    key = block_key(inputs_id, weights_fp, specs, ctx.config.damp_percent, {})
    layer_specs = {name: QuantSpec.from_dict(spec) for name, spec in specs.items()}
    groups = [names for names in ([n for n in group if n in specs] for group in ctx.reader.arch.linear_groups) if names]
    units = [solve_units(names, layer_specs) for names in groups]
    plan = {"index": index, "key": key, "weights_fp": weights_fp, "n_shards": n_shards, "shards": shards, "groups": groups,
            "units": units, "specs": specs, "cached": None,
            # per group and unit: the row chunks its solve is made of (solvers/reconstruct.solve_chunks),
            # which the flow spreads over the workers
            "chunks": [[solve_chunks(sum(rows_of[name] for name in unit), layer_specs[unit[0]]) for unit in group_units]
                       for group_units in units]}
    if force:
        return plan
    block_hit = cached(ctx.store, BLOCK_STAGE, key, logger)
    outputs = [cached(ctx.store, SHARD_HIDDEN_STAGE, shard_hidden_key(key, n_shards, s), logger) for s in range(n_shards)]
    if block_hit is not None and all(o is not None for o in outputs):
        logger.info("block %02d: cached %s", index, key[:12])
        plan["cached"] = {"block": block_hit.to_dict(), "outputs": {"key": key, "shards": [
            {"ref": o.to_dict(), "start": 0, "stop": int(o.meta["rows"])} for o in outputs]}, "cached": True, "timing": {}}
    return plan


def shard_hidden_key(key: str, n_shards: int, shard: int) -> str:
    return artifact_key(SHARD_HIDDEN_STAGE, CODE_VERSION, [key], {"shard": shard, "of": n_shards})


def _shard_inputs(ctx: RunContext, memory: dict, descriptor: dict) -> torch.Tensor:
    ref = ref_of(descriptor["ref"])
    kept = memory.pop(("hidden", ref.sha256), None)  # the previous block's outputs, still on this worker
    if kept is not None:
        return kept
    hidden, _ = ctx.store.get_tensors(ref)
    return hidden["hidden"][descriptor["start"] : descriptor["stop"]].clone()


def _unit_pieces(ctx: RunContext, results: list[dict]) -> list[UnitPiece]:
    """The pieces that solve tasks stored (their results' refs), read back from the store."""
    pieces = []
    for result in results:
        tensors, meta = ctx.store.get_tensors(ref_of(result["ref"]))
        for piece in meta["pieces"]:
            stem = f"{piece['name']}@{piece['start']}."
            parts = {name[len(stem):]: t for name, t in tensors.items() if name.startswith(stem)}
            weight_hat = parts.pop(WEIGHT_HAT)
            pieces.append(UnitPiece(piece["name"], piece["start"], piece["stop"], parts, weight_hat, piece["error_num"],
                                    piece["error_den"], piece["damp_used"], piece["seconds"]))
    return pieces


def _solved_weights(ctx: RunContext, unit_refs: list[dict]) -> dict[str, torch.Tensor]:
    """Layer -> dequantized weight, from the solve tasks' results of one or more groups."""
    return dequantized_weights(_unit_pieces(ctx, unit_refs))


def _shard_at(ctx: RunContext, memory: dict, plan: dict, shard: int, stage: int, solved: list[list[dict]]):
    """(this shard's paused pass, ready for group `stage`; whether it had to be rebuilt)."""
    state_key = ("shard", plan["key"], plan["n_shards"], shard)
    staged = memory.pop(state_key, None)  # popped: a stage that fails leaves nothing half-advanced
    if staged is not None and staged.next_group == stage and staged.usable_here():
        if stage > 0:
            set_weights(staged.block, _solved_weights(ctx, solved[stage - 1]))
        return staged, state_key, False
    if staged is not None:
        staged.close()
    reader = ctx.reader
    float_weights = {name: t.float() for name, t in reader.block_weights(plan["index"], dtype=None).items()}
    inputs = _shard_inputs(ctx, memory, plan["shards"][shard])
    earlier = _solved_weights(ctx, [unit for group in solved[:stage] for unit in group])
    staged = start_shard(reader.arch, reader.config, plan["index"], float_weights, inputs, plan["groups"], earlier, stage, BATCH_SIZE)
    return staged, state_key, stage > 0  # a shard starts at stage 0; later, it had to be rebuilt


@task(name="shard-stage", task_run_name="block-{plan[index]:02d} / shard-{shard} / stage-{stage}", **_RETRIES)
def shard_stage(config: dict, plan: dict, shard: int, stage: int, solved: list[list[dict]]) -> dict:
    """Run shard `shard`'s batches to group `stage` (the groups before it quantized with
    `solved`: per group, its units' refs) and store their Gram sum. Returns the partial's ref
    (None for an empty shard), its row count, and which worker did it."""
    raise_if_cancelled()
    ctx = RunContext.open(config)
    memory, worker = _worker()
    timing: dict[str, float] = {}
    with phase(timing, "forward"):
        staged, state_key, rebuilt = _shard_at(ctx, memory, plan, shard, stage, solved)
        partial, rows = staged.run_to(stage)
    if stage > 0:
        # every batch has passed the previous group (its quantized weights, put in for this
        # stage) and waits before this one: no batch of this shard runs through it again
        release_weights(staged.block, plan["groups"][stage - 1])
    memory[state_key] = staged
    ref = None
    if partial is not None:
        with phase(timing, "store_io"):
            # "layout": the sums are stored as GramPanels (a run's leftovers in another layout are not read)
            key = artifact_key(PARTIAL_STAGE, CODE_VERSION, [plan["key"]], {"shard": shard, "of": plan["n_shards"], "group": stage,
                                                                          "layout": "gram-panels"})
            ref = ctx.store.put_tensors(PARTIAL_STAGE, key, partial.tensors(), {"rows": rows, "worker": worker}).to_dict()
    release_free_memory()  # the stage's freed activations and Gram panels: not kept through the next task
    return {"partial": ref, "rows": rows, "worker": worker, "rebuilt": rebuilt, "timing": timing, "memory": _memory_report(memory)}


@task(name="solve-unit", task_run_name="block-{plan[index]:02d} / solve / {label}", **_RETRIES)
def solve_unit_task(config: dict, plan: dict, stage: int, unit: list[str], partials: list[dict], label: str = "",
                    rows: list[int] | None = None) -> dict:
    """Merge the shards' Gram sums of group `stage` (in shard order) and solve the row chunks of
    `unit` within `rows` of its stacked rows (all of them by default); stores the pieces' parts
    and dequantized weights (what the shards continue with)."""
    raise_if_cancelled()
    ctx = RunContext.open(config)
    _, worker = _worker()
    timing: dict[str, float] = {}
    read_s = 0.0

    def read_partials():
        # the shards' sums read one at a time as the merge takes them: two alive at most
        nonlocal read_s
        for partial in partials:
            start = time.perf_counter()
            gram_sum = None if partial["partial"] is None else GramPanels.from_tensors(ctx.store.get_tensors(ref_of(partial["partial"]))[0])
            read_s += time.perf_counter() - start
            yield gram_sum
            del gram_sum  # the merge holds it now (or has added it): not kept alive here

    prefix = ctx.reader.block_prefix(plan["index"])
    spec = QuantSpec.from_dict(plan["specs"][unit[0]])
    with phase(timing, "hessian"):
        hessian = merged_hessian(unit, read_partials(), sum(p["rows"] for p in partials), owned=True)
    # the reads ran inside the merge: store I/O, not the merge's time
    timing["hessian"] -= read_s
    timing["store_io"] = timing.get("store_io", 0.0) + read_s
    release_free_memory()  # the merged panels, before the factorization's buffers
    with phase(timing, "solve"):
        # factored first, the Hessian freed once factored, the weights read after: the task's
        # peak (beside the paused shards this worker holds) is the factorization's two buffers
        setup = prepare_unit(unit, hessian, spec, ctx.config.damp_percent, prefix, consume=True)
        weights = [ctx.reader.tensor(f"{prefix}{name}.weight").float() for name in unit]
        pieces = solve_unit_rows(unit, weights, hessian, spec, ctx.config.damp_percent, prefix, None if rows is None else tuple(rows),
                                 setup=setup)
    tensors = {}
    for piece in pieces:
        stem = f"{piece.name}@{piece.start}."
        tensors |= {stem + part: t for part, t in piece.tensors.items()}
        tensors[stem + WEIGHT_HAT] = piece.weight_hat
    described = [{"name": p.name, "start": p.start, "stop": p.stop, "error_num": p.error_num, "error_den": p.error_den,
                  "damp_used": p.damp_used, "seconds": round(p.seconds, 3)} for p in pieces]
    with phase(timing, "store_io"):
        key = artifact_key(UNIT_STAGE, CODE_VERSION, [plan["key"]], {"group": stage, "unit": unit, **({"rows": rows} if rows else {})})
        ref = ctx.store.put_tensors(UNIT_STAGE, key, tensors, {"pieces": described, "worker": worker})
    del tensors, pieces, hessian
    release_free_memory()
    return {"ref": ref.to_dict(), "unit": unit, "worker": worker, "timing": timing}


@task(name="shard-finish", task_run_name="block-{plan[index]:02d} / shard-{shard} / outputs", **_RETRIES)
def shard_finish(config: dict, plan: dict, shard: int, solved: list[list[dict]]) -> dict:
    """Run shard `shard` through the block's last groups, store its outputs (the next block's
    inputs, kept in this worker's memory too) and, on shard 0, measure the block's output error
    on the first samples against the float block, as the single-process path does."""
    raise_if_cancelled()
    ctx = RunContext.open(config)
    memory, worker = _worker()
    timing: dict[str, float] = {}
    stage = len(plan["groups"])
    with phase(timing, "forward"):
        staged, _, rebuilt = _shard_at(ctx, memory, plan, shard, stage, solved)
        outputs = staged.finish()
    if outputs is None:  # an empty shard: nothing flows on from it
        outputs = torch.empty(0, 0, 0)
    error = None
    if shard == 0 and outputs.numel():
        reader = ctx.reader
        float_weights = {name: t.float() for name, t in reader.block_weights(plan["index"], dtype=None).items()}
        with phase(timing, "forward"):
            inputs = _shard_inputs(ctx, {}, plan["shards"][0])[:ERROR_SAMPLES]
            error = float_output_error(reader.arch, reader.config, plan["index"], float_weights, inputs, outputs, BATCH_SIZE)
        error_samples = inputs.shape[0]
    with phase(timing, "store_io"):
        key = shard_hidden_key(plan["key"], plan["n_shards"], shard)
        ref = ctx.store.put_tensors(SHARD_HIDDEN_STAGE, key, {"hidden": outputs},
                                    {"index": plan["index"] + 1, "shard": shard, "rows": outputs.shape[0], "worker": worker})
    memory[("hidden", ref.sha256)] = outputs
    release_free_memory()  # the block's paused forwards are gone: one block's working set at a time
    result = {"ref": ref.to_dict(), "rows": outputs.shape[0], "worker": worker, "rebuilt": rebuilt, "timing": timing,
              "memory": _memory_report(memory)}
    if error is not None:
        result |= {"output_error": error, "output_error_samples": error_samples}
    return result


@task(name="assemble-block", task_run_name="block-{plan[index]:02d} / assemble", **_RETRIES)
def assemble_block(config: dict, plan: dict, solved: list[list[dict]], finished: list[dict], stages: list[list[dict]],
                   seconds: float) -> dict:
    """The block artifact from its solved units (layers in the single-process path's order)
    and the shards' outputs as the next block's inputs; the same result shape as the
    single-process block task."""
    ctx = RunContext.open(config)
    timing: dict[str, float] = {}
    records, parts = [], {}
    with phase(timing, "store_io"):
        pieces = [_unit_pieces(ctx, group) for group in solved]
    # layers in the single-process path's order: group by group, unit by unit
    for group_units, group_pieces in zip(plan["units"], pieces):
        for unit in group_units:
            spec = QuantSpec.from_dict(plan["specs"][unit[0]])
            for outcome, _ in assemble_unit(unit, spec, [p for p in group_pieces if p.name in unit]):
                records.append(LayerRecord.measured(outcome.name, outcome.spec, outcome.shape, outcome.error, outcome.damp_used,
                                                    outcome.seconds, outcome.tensors))
                parts[outcome.name] = outcome.tensors
    tensors, layers = BlockArtifact(records, parts, {}).encode()
    for task_result in [r for stage in stages for r in stage] + [u for group in solved for u in group] + finished:
        for name, value in task_result.get("timing", {}).items():
            timing[name] = timing.get(name, 0.0) + value
    shard_results = [r for stage in stages for r in stage] + finished
    workers = sorted({r["worker"] for r in shard_results})
    # per worker: the largest peak RSS its shard tasks saw, and its idle RSS
    memory = {w: {"peak_rss_mb": max(r["memory"]["peak_rss_mb"] for r in shard_results if r["worker"] == w),
                  "idle_rss_mb": min(r["memory"]["idle_rss_mb"] for r in shard_results if r["worker"] == w)} for w in workers}
    rebuilt = sum(bool(r.get("rebuilt")) for stage in stages for r in stage) + sum(bool(f.get("rebuilt")) for f in finished)
    first = finished[0]
    meta = {"index": plan["index"], "weights_fp": plan["weights_fp"], "layers": layers, "output_error": first.get("output_error"),
            "tuning": {}, "seconds": round(seconds, 3), "stage": BLOCK_STAGE,
            "output_error_samples": first.get("output_error_samples", 0), "timing": {k: round(v, 3) for k, v in timing.items()},
            # the staged pass, plus the float block on the error samples (rebuilds' re-runs not counted)
            "forwards": 1.0 + first.get("output_error_samples", 0) / max(1, sum(f["rows"] for f in finished)), "shards": {"count": plan["n_shards"], "workers": workers, "rebuilt": rebuilt, "memory": memory}}
    with phase(timing, "store_io"):
        block_ref = ctx.store.put_tensors(BLOCK_STAGE, plan["key"], tensors, meta)
        pruned = prune_block_intermediates(ctx.store, stages, solved)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    get_run_logger().info("block %02d: %d shards on %d workers (%d rebuilt), output error %s, %.1fs, flow peak RSS %.0f MB",
                          plan["index"], plan["n_shards"], len(workers), rebuilt, first.get("output_error"), seconds, peak_mb)
    return {"block": block_ref.to_dict(),
            "outputs": {"key": plan["key"], "shards": [{"ref": f["ref"], "start": 0, "stop": f["rows"]} for f in finished]},
            "cached": False, "timing": {k: round(v, 3) for k, v in timing.items()}, "workers": workers, "rebuilt": rebuilt,
            "worker_memory": memory, "pruned": pruned}


def prune_block_intermediates(store, stages: list[list[dict]], solved: list[list[dict]]) -> int:
    """Discard an assembled block's shard Gram sums and solved units; returns how many.

    They exist only to rebuild the block's stages after a lost worker; once the block artifact
    is committed nothing reads them, and they are the bulk of a run's store (float64 Gram sums
    per shard and group, dequantized weights per unit: 0.9 GB per block of a hidden-2048 model
    on 2 shards). Kept, the store would grow with the model's depth; pruned, it holds the
    blocks and their outputs, as an in-process run's does. A crash before this leaves them for
    the resumed run, which prunes them when it assembles the block."""
    refs = [p["partial"] for stage in stages for p in stage if p["partial"] is not None] + [u["ref"] for group in solved for u in group]
    for data in refs:
        store.discard(ref_of(data))
    return len(refs)

