"""Many workers on one run: scaling and per-worker memory on a synthetic model.

Two measurements, each a `layerquant quantize` over a local Dask cluster (--workers, one thread
per worker process) on a synthesized float32 Llama (bench/memory_streaming.py's builder):

1. Scaling: the 24-block model with 1 worker x 1 thread, then 2 workers x 1 thread. The ratio
   isolates scaling from threading: efficiency = time1 / (2 x time2), where time is the blocks'
   wall time (the sum of the block artifacts' seconds: plan to assembled block, the cluster's
   start and the evaluation left out; also without block 0, whose first task on each worker
   starts that worker's Prefect engine) and, for reference, the whole command's wall time.
2. Memory: the same width with 24 and with 48 blocks on 2 workers: each worker's peak RSS
   (ru_maxrss, as its shard tasks saw it) and its idle RSS (before its first shard: imports,
   Prefect client), against the model's size. Flat between 24 and 48 blocks = bounded by one
   block, not by the model.

Full configuration (the issue's): --hidden 2048 --intermediate 5632 --nsamples 64 --seqlen 256
(24 blocks = 4.9 GB, 48 blocks = 9.7 GB float32; hours on a 2-core machine, and it needs the
machine to itself for the timings to mean anything). --tiny runs a small configuration in a few
minutes to check the script end to end; its numbers say nothing about scaling.

Run: .venv/bin/python bench/dask_scaling.py [--tiny] [--workdir DIR] [--only scaling|memory]
Writes bench/results/dask_scaling.json (one row per case, each part as soon as it is measured; --tiny rows are
marked "tiny"; a part re-run replaces its rows of the same configuration).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import commit, conditions, empty_store, load_rows, machine, run_measured, write_rows  # noqa: E402
from memory_streaming import synthesize  # noqa: E402


def model_folder(workdir: Path, hidden: int, intermediate: int, blocks: int) -> tuple[Path, int]:
    folder = workdir / f"model-{blocks}x{hidden}"
    if not (folder / "config.json").exists():
        return folder, synthesize(folder, hidden, intermediate, blocks)
    return folder, sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def block_seconds(store: Path, skip_first: bool = False) -> float:
    """Sum of the run's block artifacts' own seconds (plan to assembled block); `skip_first`
    leaves out block 0, whose first task on each worker also starts that worker's Prefect
    task engine and API client (tens of seconds on a loaded machine, once per worker)."""
    total = 0.0
    for record in (store / "cas" / "block").rglob("*.sha256.json"):
        meta = json.loads(record.read_text())["meta"]
        if not (skip_first and meta["index"] == 0):
            total += meta["seconds"]
    return round(total, 2)


def run_case(workdir: Path, model: Path, workers: int, args) -> dict:
    store, out = workdir / f"store-{model.name}-w{workers}", workdir / f"out-{model.name}-w{workers}"
    empty_store(store)  # a cold run, not cache hits
    command = [str(Path(sys.executable).parent / "layerquant"), "quantize", "--model", str(model),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval-windows", "2", "--eval-seqlen", str(args.seqlen),
               "--bits", "4", "--group-size", "128", "--workers", str(workers), "--threads-per-worker", "1",
               "--store", str(store), "--out", str(out), "--overwrite"]
    result = run_measured(command, env=dict(os.environ))
    if result["returncode"] != 0:
        print(result["stderr"][-3000:], file=sys.stderr)
        raise SystemExit(f"layerquant failed on {model.name} with {workers} workers")
    report = json.loads((out / "report.json").read_text())
    per_worker: dict[str, dict[str, float]] = {}
    for block in report["cluster"]["worker_memory"]:
        for worker, memory in block.items():
            seen = per_worker.setdefault(worker, {"peak_rss_mb": 0.0, "idle_rss_mb": memory["idle_rss_mb"]})
            seen["peak_rss_mb"] = max(seen["peak_rss_mb"], memory["peak_rss_mb"])
            seen["idle_rss_mb"] = min(seen["idle_rss_mb"], memory["idle_rss_mb"])
    measured = {"wall_s": result["wall_s"], "blocks_s": block_seconds(store), "warm_blocks_s": block_seconds(store, skip_first=True),
                "ppl_quant": report["ppl_quant"], "peak_rss_tree_mb": result["peak_rss_mb"], "worker_memory": per_worker,
                "shards": report["cluster"]["shards"]}
    # the full configuration's stores and outputs are several GB each: keep the disk for the next case
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    return measured


def scaling_row(common: dict, blocks: int, size: int, one: dict, two: dict) -> dict:
    return common | {"case": "scaling", "n_blocks": blocks, "model_mb": round(size / 2**20, 1),
                     "time1_blocks_s": one["blocks_s"], "time2_blocks_s": two["blocks_s"],
                     "efficiency_blocks": round(one["blocks_s"] / (2 * two["blocks_s"]), 3),
                     "time1_warm_blocks_s": one["warm_blocks_s"], "time2_warm_blocks_s": two["warm_blocks_s"],
                     "efficiency_warm_blocks": round(one["warm_blocks_s"] / (2 * max(two["warm_blocks_s"], 1e-9)), 3),
                     "time1_wall_s": one["wall_s"], "time2_wall_s": two["wall_s"],
                     "efficiency_wall": round(one["wall_s"] / (2 * two["wall_s"]), 3)}


def memory_rows(common: dict, cases: list[tuple[int, dict, int]]) -> list[dict]:
    """Per worker and depth: peak and idle RSS and the working set against the model's size;
    then the flatness of the largest peak between the depths."""
    rows = []
    for blocks, case, model_bytes in cases:
        for worker, memory in sorted(case["worker_memory"].items()):
            working = memory["peak_rss_mb"] - memory["idle_rss_mb"]
            rows.append(common | {"case": "memory", "n_blocks": blocks, "model_mb": round(model_bytes / 2**20, 1), "worker": worker,
                                  **memory, "working_mb": round(working, 1),
                                  "working_fraction_of_model": round(working / (model_bytes / 2**20), 4)})
    peaks = {blocks: max(r["peak_rss_mb"] for r in rows if r["n_blocks"] == blocks) for blocks, _, _ in cases}
    (shallow, _, _), (deep, _, _) = cases
    rows.append(common | {"case": "memory_flatness", "peak_rss_24_mb": peaks[shallow], "peak_rss_48_mb": peaks[deep],
                          "ratio": round(peaks[deep] / peaks[shallow], 3)})
    return rows


def save(rows: list[dict], tiny: bool, replaced_cases: set[str]) -> None:
    """Keep the other configuration's rows and this configuration's rows of cases not re-run."""
    kept = [r for r in load_rows("dask_scaling") if r.get("tiny") != tiny or r.get("case") not in replaced_cases]
    write_rows("dask_scaling", kept + rows)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tiny", action="store_true", help="a small configuration that checks the script, not the scaling")
    parser.add_argument("--only", choices=("scaling", "memory"), default=None,
                        help="one measurement: the 1 vs 2 worker pair, or 24 vs 48 blocks on 2 workers")
    parser.add_argument("--skip-memory", action="store_true", help="same as --only scaling")
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.intermediate, args.blocks, args.nsamples, args.seqlen = 256, 512, 2, 16, 64
    else:
        args.hidden, args.intermediate, args.blocks, args.nsamples, args.seqlen = 2048, 5632, 24, 64, 256
    only = "scaling" if args.skip_memory else args.only
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lq-daskbench-"))
    common = {"bench": "dask_scaling", "tool": "layerquant", "hidden": args.hidden, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "threads_per_worker": 1, "tiny": args.tiny, **conditions(), "machine": machine(), "commit": commit(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    model, size = model_folder(workdir, args.hidden, args.intermediate, args.blocks)
    two = None
    if only in (None, "scaling"):
        one = run_case(workdir, model, 1, args)
        two = run_case(workdir, model, 2, args)
        assert one["ppl_quant"] == two["ppl_quant"], "1 and 2 workers must give the same model"
        row = scaling_row(common, args.blocks, size, one, two)
        print(json.dumps(row, indent=2))
        save([row], args.tiny, {"scaling"})  # written now: the memory part takes longer still
    if only in (None, "memory"):
        two = two or run_case(workdir, model, 2, args)
        deep, deep_size = model_folder(workdir, args.hidden, args.intermediate, 2 * args.blocks)
        deeper = run_case(workdir, deep, 2, args)
        rows = memory_rows(common, [(args.blocks, two, size), (2 * args.blocks, deeper, deep_size)])
        print(json.dumps(rows, indent=2))
        save(rows, args.tiny, {"memory", "memory_flatness"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
