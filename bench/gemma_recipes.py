"""Gemma 3 270M: the shipped Gemma recipes, each run through the CLI as a user runs it.

Run: .venv/bin/python bench/gemma_recipes.py [--recipes a,b]
(about 9 minutes for gemma-3-w4a4kv4 on 2 cores: quantization, then the float, prompt-cache and
whole-cache evaluations)
Writes bench/results/gemma_recipes.json, one row per recipe, each with the command, the commit and
the load average at its start.

Protocol: `layerquant quantize --recipe recipes/NAME.yaml` on the peers' Gemma windows
(bench/gemma_methods.py: calibration = the first 32 x 512 WikiText-2 validation tokens, "ppl" = the
first 6 BOS-prefixed 2048-token windows of the WikiText-2 test set, float 17.507), into a store
emptied first (a cold run: its wall time is the whole run's, Prefect's temporary server included).
bench/gemma_bisup.py composes the same solver calls without Prefect for its table; this is the
check that a user's run gives the recipe's number.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import commit, conditions, empty_store, load_rows, machine, run_layerquant_case, write_rows  # noqa: E402
from gemma_methods import WINDOWS  # noqa: E402

ROOT = HERE.parent
RECIPES = ROOT / "recipes"
RESULTS = "gemma_recipes"
NAMES = ("gemma-3-w4a4kv4",)


def shown(flag: str, model: str) -> str:
    """A flag as the row records it: paths relative to the checkout, the local model folder by name."""
    if flag == model:
        return "<gemma-3-270m>"
    return str(Path(flag).relative_to(ROOT)) if flag.startswith(str(ROOT)) else flag


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", help=f"comma-separated recipe names (default: {','.join(NAMES)})")
    parser.add_argument("--store", default=str(Path.home() / ".cache" / "layerquant" / "bench-store" / "gemma-recipes"))
    parser.add_argument("--out-root", default=str(Path.home() / ".cache" / "layerquant" / "bench-out" / "gemma-recipes"))
    args = parser.parse_args()
    model = subprocess.run([sys.executable, str(HERE / "prepare_gemma.py")], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    chosen = args.recipes.split(",") if args.recipes else list(NAMES)
    rows = [row for row in load_rows(RESULTS) if row["case"] not in chosen]
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    for name in chosen:
        recipe = RECIPES / f"{name}.yaml"
        flags = ["--model", model, "--recipe", str(recipe), *WINDOWS]
        empty_store(args.store)
        at_start, code = conditions(), commit()
        result = run_layerquant_case(name, flags, args.store, args.out_root, env)
        report = result["report"]
        rows.append({
            "bench": RESULTS, "case": name, "tool": "layerquant", "tool_version": version("layerquant"), "model": "gemma-3-270m",
            "command": ["layerquant", "quantize", *(shown(flag, model) for flag in flags)],
            "runtime_quant": report["config"].get("runtime_quant"), "avg_bits": report["avg_bits"],
            "ppl": report["ppl_quant"], "ppl_fp": report["ppl_fp"], "ppl_over_float": report["ppl_quant"] / report["ppl_fp"],
            "prompt_cache": report.get("prompt_cache"), "eval_text": "wikitext2_test_gptq_join", "eval_windows": 6, "eval_seqlen": 2048,
            "wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_mb"], "workers": 1, "commit": code,
            **at_start, "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        write_rows(RESULTS, rows)  # after every recipe: a crash loses nothing finished
        print(f"{name}: ppl {report['ppl_quant']:.4f} (float {report['ppl_fp']:.4f}, {report['ppl_quant'] / report['ppl_fp']:.3f}x) "
              f"{result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
