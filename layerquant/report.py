"""The run report: what was done to every layer, what it costs, how good the result is."""
from __future__ import annotations

import platform
import os
from datetime import datetime, timezone
from typing import Any

from layerquant.serving import runtime_unservable, vllm_servable
from layerquant.specs import QuantSpec


def machine_description() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # torch missing or CUDA misconfigured: the report still gets written
        gpu = "unknown GPU"
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory_gb:.0f} GiB, {gpu}"


# the time split of a run, in the order a person reads it ("calibration": tokenizing the windows
# and embedding them); "orchestration" is the rest of the wall time: Prefect (task runs,
# artifacts, manifests) plus the untimed work inside tasks (opening the store and checkpoint)
TIMING_PHASES = ("calibration", "read_weights", "forward", "hessian", "solve", "tuning", "scoring", "evaluation", "store_io", "lease_wait")


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


def divergence_fields(quant: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation made against the float model adds (None where it was not): the
    perplexity ratio quantized / float with its paired 95% interval over the windows
    (solvers.evaluation.paired_ratio), mean and 99th percentile of the per-token
    KL(float || quantized) in nats, and the share of tokens whose top-1 prediction is unchanged."""
    paired = quant.get("paired")
    return {
        "ppl_ratio": paired["ratio"] if paired else None,
        "ppl_ratio_ci95": [paired["low"], paired["high"]] if paired else None,
        "kl_mean": quant.get("kl_mean"),
        "kl_p99": quant.get("kl_p99"),
        "top1_agreement": quant.get("top1_agreement"),
    }


# what an evaluation entry has that the report's top level states under other names or not at all
PER_TEXT_ONLY = ("windows", "seqlen", "window_tokens", "window_nll_fp", "window_nll_quant")


def evaluation_entry(ppl_fp: dict[str, Any], ppl_quant: dict[str, Any]) -> dict[str, Any]:
    """One evaluation text's results in the report, per-window NLL sums included (for paired
    comparisons with other runs on the same windows)."""
    return {
        "ppl_fp": ppl_fp["ppl"],
        "ppl_quant": ppl_quant["ppl"],
        "ppl_increase_pct": 100.0 * (ppl_quant["ppl"] / ppl_fp["ppl"] - 1.0),
        "nll_std_err": ppl_quant.get("nll_std_err"),
        **divergence_fields(ppl_quant),
        "windows": ppl_fp["windows"],
        "seqlen": ppl_fp["seqlen"],
        "window_tokens": ppl_quant.get("window_tokens"),
        "window_nll_fp": ppl_fp.get("window_nll"),
        "window_nll_quant": ppl_quant.get("window_nll"),
    }


def build_report(
    block_metas: list[dict[str, Any]],
    block_prefixes: list[str],
    ppl_fp: dict[str, Any],
    ppl_quant: dict[str, Any],
    run: dict[str, Any],
    evaluations: dict[str, tuple[dict[str, Any], dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """`ppl_fp` / `ppl_quant`: the headline (first) evaluation text's results; `evaluations`:
    text name -> (float, quantized) results of every text, the headline's included."""
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
        # the headline text's perplexities, their noise level (standard error of the quantized
        # model's mean token NLL over the windows) and its divergence from the float model
        **{key: value for key, value in evaluation_entry(ppl_fp, ppl_quant).items() if key not in PER_TEXT_ONLY},
        "eval_windows": ppl_fp["windows"],
        "eval_seqlen": ppl_fp["seqlen"],
        "evaluations": {name: evaluation_entry(fp, quant) for name, (fp, quant) in (evaluations or {}).items()},
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
        # what the run computes at run time (activations, KV cache, rotations, corrections) that
        # vLLM cannot run or no packed format can say: one sentence each
        "runtime_unservable": runtime_unservable(
            (run.get("config") or {}).get("runtime_quant") or {},
            {prefix + layer["name"]: QuantSpec.from_dict(layer["spec"])
             for meta, prefix in zip(block_metas, block_prefixes) for layer in meta["layers"]},
            (run.get("config") or {}).get("lowrank_rank", 0), bool((run.get("config") or {}).get("act_clip"))),
        "machine": machine_description(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def evaluation_markdown(report: dict[str, Any]) -> str:
    """One row per evaluation text: perplexities, the ratio's paired 95% interval, KL, top-1."""
    rows = "".join(
        f"| {name} | {e['ppl_fp']:.4f} | {e['ppl_quant']:.4f} | {e['ppl_ratio']:.4f} [{e['ppl_ratio_ci95'][0]:.4f}, "
        f"{e['ppl_ratio_ci95'][1]:.4f}] | {e['kl_mean']:.5f} | {e['kl_p99']:.5f} | {100 * e['top1_agreement']:.2f}% |\n"
        for name, e in report["evaluations"].items() if e["ppl_ratio"] is not None)
    return ("## Quantized against float\n\nKL(float || quantized) per token in nats; top-1: tokens whose most likely "
            "next token is unchanged; ratio: quantized / float perplexity, paired 95% interval over the windows.\n\n"
            "| text | float ppl | quantized ppl | ratio [95% CI] | mean KL | KL p99 | top-1 agreement |\n|---|---|---|---|---|---|---|\n"
            + rows + "\n")
