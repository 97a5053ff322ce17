"""The run report: what was done to every layer, what it costs, how good the result is."""
from __future__ import annotations

import platform
import os
from datetime import datetime, timezone
from typing import Any

from layerquant.serving import vllm_servable
from layerquant.specs import QuantSpec


def machine_description() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # torch missing or CUDA misconfigured: the report still gets written
        gpu = "unknown GPU"
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory_gb:.0f} GiB, {gpu}"


# the time split of a run, in the order a person reads it; "orchestration" is the rest of the
# wall time: Prefect (task runs, artifacts, manifests) plus small untimed work (tokenizing)
TIMING_PHASES = ("read_weights", "forward", "hessian", "solve", "tuning", "scoring", "evaluation", "store_io", "lease_wait")


def timing_summary(task_timings: list[dict[str, float]], wall_s: float) -> dict[str, Any]:
    """Seconds by phase summed over the run's task calls, the rest as orchestration, and each
    phase's share of the wall time."""
    seconds = merge_timings({name: 0.0 for name in TIMING_PHASES}, *task_timings)
    seconds["orchestration"] = max(wall_s - sum(seconds.values()), 0.0)
    return {"seconds": {name: round(value, 2) for name, value in seconds.items()},
            "share": {name: round(value / wall_s, 4) if wall_s > 0 else 0.0 for name, value in seconds.items()}}


def merge_timings(*timings: dict[str, float]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for timing in timings:
        for name, value in timing.items():
            merged[name] = merged.get(name, 0.0) + value
    return merged


def forwards_per_block(block_metas: list[dict[str, Any]]) -> float:
    """Block forwards over all calibration samples that quantizing a block took, on average
    (1 for the staged pass alone; 0 for a data-free run)."""
    return round(sum(meta.get("forwards", 0.0) for meta in block_metas) / max(len(block_metas), 1), 3)


def build_report(
    block_metas: list[dict[str, Any]],
    block_prefixes: list[str],
    ppl_fp: dict[str, Any],
    ppl_quant: dict[str, Any],
    run: dict[str, Any],
) -> dict[str, Any]:
    layers = []
    for meta, prefix in zip(block_metas, block_prefixes):
        for layer in meta["layers"]:
            spec = layer["spec"]
            layers.append({
                "name": prefix + layer["name"],
                "bits": spec["bits"] if spec["method"] != "pbllm" else None,
                "group_size": spec["group_size"],
                "sym": spec["sym"],
                "method": spec["method"],
                "error": layer["error"],
                "bits_per_weight": layer["storage_bits"] / layer["n_weights"],
                "n_weights": layer["n_weights"],
                "damp": layer["damp"],
            })
    total_bits = sum(l["storage_bits"] for meta in block_metas for l in meta["layers"])
    total_weights = sum(l["n_weights"] for meta in block_metas for l in meta["layers"])
    return {
        **run,
        "ppl_fp": ppl_fp["ppl"],
        "ppl_quant": ppl_quant["ppl"],
        "ppl_increase_pct": 100.0 * (ppl_quant["ppl"] / ppl_fp["ppl"] - 1.0),
        # standard error of the quantized model's mean token NLL over the windows (noise level)
        "nll_std_err": ppl_quant.get("nll_std_err"),
        "eval_windows": ppl_fp["windows"],
        "eval_seqlen": ppl_fp["seqlen"],
        "avg_bits": total_bits / max(total_weights, 1),
        "quantized_weights": total_weights,
        "quantized_mb": total_bits / 8 / 2**20,
        "blocks": [
            {"index": meta["index"], "output_error": meta["output_error"], "seconds": meta["seconds"], "tuning": meta.get("tuning", {})}
            for meta in block_metas
        ],
        "layers": layers,
        "vllm_unservable": [
            prefix + layer["name"]
            for meta, prefix in zip(block_metas, block_prefixes)
            for layer in meta["layers"]
            if not vllm_servable(QuantSpec.from_dict(layer["spec"]))
        ],
        "machine": machine_description(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
