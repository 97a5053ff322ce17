"""Gemma 3 270M: GPTQ, norm tweaking, refinement and PB-LLM at 4, 3 and about 2 bits.

Run: .venv/bin/python bench/gemma_methods.py [--cases a,b] [--force]
(10-30 minutes per case on 2 cores; finished cases are kept and skipped on a re-run)
Writes bench/results/gemma_methods.json.

Protocol (the llm-compressor reference in the project's assets README): calibration = the first
32 x 512 tokens of the WikiText-2 validation tokens, evaluation = the first 6 BOS-prefixed
2048-token windows of the WikiText-2 test set (GPTQ join), group size 128, symmetric.
Six windows are what one can afford here (one 2048-token forward costs ~20 s), and their
noise is large: the per-window standard error of the mean token NLL is ~0.15, so only
differences of more than ~30% in perplexity are clear. The model comes from a Q4_K_M GGUF:
its weights already sit on llama.cpp grids (mostly 5-bit), which flatters 5+ bit results.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import conditions, load_rows, machine, run_layerquant_case, write_rows  # noqa: E402

HERE = Path(__file__).parent
DATA = HERE / "data"
# the peers' Gemma windows (bench/gemma_recipes.py runs its recipes on them too)
WINDOWS = ["--calib", str(DATA / "wikitext2_valid_tokens.txt"), "--eval", str(DATA / "wikitext2_test_gptq_join.txt"),
           "--nsamples", "32", "--seqlen", "512", "--calib-selection", "first", "--eval-windows", "6", "--eval-seqlen", "2048"]
PROTOCOL = [*WINDOWS, "--group-size", "128"]
TUNED = ["--refine-steps", "100", "--norm-tweak-steps", "100"]
# the tuned rows of 2026-11-22 compared outputs in the residual space (the default then)
RESIDUAL = ["--tuning-space", "residual"]
# in the order they are worth running (each takes 10-30 min here); the mixed-precision and
# uniform-of-the-same-size cases live in bench/peers/run_all.py, next to llm-compressor's
CASES: dict[str, list[str]] = {
    "gptq-w4": ["--bits", "4"],
    "gptq-w2-g64": ["--bits", "2", "--group-size", "64"],
    "pbllm-s0.05": ["--method", "pbllm", "--salient-fraction", "0.05"],
    "gptq-w2-g64+normtweak": ["--bits", "2", "--group-size", "64", "--norm-tweak-steps", "100", *RESIDUAL],
    "gptq-w3+normtweak": ["--bits", "3", "--norm-tweak-steps", "100", *RESIDUAL],
    "gptq-w2-g64+refine": ["--bits", "2", "--group-size", "64", "--refine-steps", "100", *RESIDUAL],
    "gptq-w3+refine": ["--bits", "3", "--refine-steps", "100", *RESIDUAL],
    "gptq-w3": ["--bits", "3"],
    "gptq-w4+normtweak": ["--bits", "4", "--norm-tweak-steps", "100", *RESIDUAL],
    "gptq-w4+refine": ["--bits", "4", "--refine-steps", "100", *RESIDUAL],
    "pbllm-s0.1": ["--method", "pbllm", "--salient-fraction", "0.1"],
    "gptq-w3+refine+normtweak": ["--bits", "3", *TUNED, *RESIDUAL],
    # tuning losses measured after the next block's input norm (the default since 2026-12-02):
    # Gemma keeps most of its residual energy in one channel the next norm all but ignores
    "gptq-w2-g64+refine@next_norm": ["--bits", "2", "--group-size", "64", "--refine-steps", "100", "--tuning-space", "next_norm"],
    "gptq-w2-g64+normtweak@next_norm": ["--bits", "2", "--group-size", "64", "--norm-tweak-steps", "100", "--tuning-space", "next_norm"],
    "gptq-w3+refine@next_norm": ["--bits", "3", "--refine-steps", "100", "--tuning-space", "next_norm"],
    "gptq-w4+refine@next_norm": ["--bits", "4", "--refine-steps", "100", "--tuning-space", "next_norm"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun cases that already have a row")
    parser.add_argument("--store", default=str(Path.home() / ".cache" / "layerquant" / "bench-store" / "gemma"))
    parser.add_argument("--out-root", default=str(Path.home() / ".cache" / "layerquant" / "bench-out" / "gemma"))
    args = parser.parse_args()
    model = subprocess.run([sys.executable, str(HERE / "prepare_gemma.py")], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    model_mb = round(sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 2**20, 1)
    chosen = args.cases.split(",") if args.cases else list(CASES)
    rows = [row for row in load_rows("gemma_methods") if args.force is False or row["case"] not in chosen]
    done = {row["case"] for row in rows}
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    for case in chosen:
        if case in done:
            continue
        at_start = conditions()
        result = run_layerquant_case(case, ["--model", model, *PROTOCOL, *CASES[case]], args.store, args.out_root, env)
        report = result["report"]
        config = report["config"]
        rows.append({
            "bench": "gemma_methods", "case": case, "tool": "layerquant", "tool_version": version("layerquant"), "model": "gemma-3-270m",
            "model_mb": model_mb, "n_blocks": report["n_blocks"],
            "method": case, "bits": config["bits"] if not config.get("budget") else None, "group_size": config["group_size"],
            "budget": config.get("budget"), "refine_steps": config["refine_steps"], "norm_tweak_steps": config["norm_tweak_steps"],
            "tuning_space": config.get("tuning_space", "residual"),
            "avg_bits": report["avg_bits"], "ppl": report["ppl_quant"], "ppl_fp": report["ppl_fp"], "nll_std_err": report["nll_std_err"],
            "eval_text": "wikitext2_test_gptq_join", "eval_windows": 6, "eval_seqlen": 2048,
            "wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_mb"], "workers": 1,
            **at_start, "machine": machine(), "date": datetime.now(timezone.utc).date().isoformat(),
        })
        write_rows("gemma_methods", rows)  # after every case: a crash loses nothing finished
        print(f"{case:28s} ppl {report['ppl_quant']:8.3f} (fp {report['ppl_fp']:.3f}) avg_bits {report['avg_bits']:.3f} "
              f"{result['wall_s']:.0f}s {result['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
