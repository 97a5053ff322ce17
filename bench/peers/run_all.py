"""Side by side with llm-compressor: the same models, calibration tokens and evaluation windows,
measured by the same evaluator (layerquant's), on this machine.

Run: .venv/bin/python bench/peers/run_all.py [--models stories260K,gemma-3-270m] [--force]
First run: ~5 min to build the peers venv, then stories260K ~5 min, Gemma 3 270M ~60 min
(2 cores). Finished cases are kept in bench/results/peers.json and skipped on a re-run.
Writes bench/results/peers.json, peers.md (table) and peers.png (perplexity vs average bits).

llm-compressor runs in its own virtual environment (~/.cache/layerquant/venvs/peers), so the
project's stays clean. Its output is saved as a float checkpoint holding its fake-quantized
weights and evaluated by `layerquant eval` on the same windows as ours. llm-compressor has no bit
allocator: at the mixed budgets its row is the best uniform configuration of that size or less.
GPTQModel is not included: it needs CUDA kernels to quantize (no CPU path in its releases here).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import RESULTS, load_rows, machine, run_layerquant_case, run_measured, write_rows  # noqa: E402

CACHE = Path.home() / ".cache" / "layerquant"
PEERS_VENV = CACHE / "venvs" / "peers"
PEER_PACKAGES = ["torch==2.13.0", "llmcompressor==0.14.0.1", "matplotlib"]
ASSETS = ROOT / "layerquant" / "assets"

MODELS = {
    "stories260K": dict(
        path=lambda: str(ASSETS / "models" / "stories260K"),
        calib=str(ASSETS / "text" / "tinystories_calib_190k.txt"), eval=str(ASSETS / "text" / "tinystories_eval_600k.txt"),
        nsamples=128, seqlen=256, eval_windows=200, eval_seqlen=256, group=32,
        peer_special={"down_proj": 43},  # 172 columns: llm-compressor refuses a ragged group
        # (label, bits, group) of llm-compressor's uniform rows (its 2-bit row is its config nearest 2.5 bits)
        peer_cases=[("gptq-w4", 4, 32), ("gptq-w3", 3, 32), ("gptq-w2", 2, 32)],
    ),
    "gemma-3-270m": dict(
        path=lambda: subprocess.run([sys.executable, str(BENCH / "prepare_gemma.py")], check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1],
        calib=str(BENCH / "data" / "wikitext2_valid_tokens.txt"), eval=str(BENCH / "data" / "wikitext2_test_gptq_join.txt"),
        nsamples=32, seqlen=512, eval_windows=6, eval_seqlen=2048, group=128, peer_special={},
        peer_cases=[("gptq-w4", 4, 128), ("gptq-w3", 3, 128)],
    ),
}
# layerquant's rows: (label, extra flags)
OURS = {
    "stories260K": [("gptq-w4", ["--bits", "4"]), ("gptq-w3", ["--bits", "3"]), ("ip-3.25", ["--budget", "3.25"]),
                    ("ip-2.5", ["--budget", "2.5"]), ("gptq-w3+refine+normtweak", ["--bits", "3", "--refine-steps", "100", "--norm-tweak-steps", "100"]),
                    ("ip-2.5+refine+normtweak", ["--budget", "2.5", "--refine-steps", "100", "--norm-tweak-steps", "100"])],
    "gemma-3-270m": [("gptq-w4", ["--bits", "4"]), ("gptq-w3", ["--bits", "3"]),
                     ("gptq-w3+refine+normtweak", ["--bits", "3", "--refine-steps", "100", "--norm-tweak-steps", "100"])],
}


def ensure_peers_venv() -> Path:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    probe = subprocess.run([str(python), "-c", "import llmcompressor, matplotlib"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def peer_version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import llmcompressor; print(llmcompressor.__version__)"], check=True,
                          capture_output=True, text=True).stdout.strip()


def calibration_windows(spec: dict, model: str, path: Path) -> None:
    """The calibration windows layerquant uses (first N x L tokens, BOS-prefixed) for the peer."""
    from safetensors.torch import save_file

    from layerquant.infra.texts import load_tokenizer, read_text, tokenize
    from layerquant.solvers.windows import make_windows

    tokenizer = load_tokenizer(model)
    windows = make_windows(tokenize(tokenizer, read_text(spec["calib"])), spec["nsamples"], spec["seqlen"], tokenizer.bos_token_id, "first")
    save_file({"tokens": windows.contiguous()}, path)


def our_eval(model_dir: str, spec: dict, store: str) -> dict:
    command = [sys.executable, "-m", "layerquant.cli", "eval", "--model", model_dir, "--text", spec["eval"],
               "--windows", str(spec["eval_windows"]), "--seqlen", str(spec["eval_seqlen"]), "--store", store]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def peer_avg_bits(model: str, bits: int, group: int, special: dict[str, int]) -> float:
    """Storage per quantized weight as layerquant counts it: codes + one fp16 scale per group."""
    from layerquant.infra.checkpoint import CheckpointReader

    reader = CheckpointReader(model)
    total = weights = 0
    for index in range(reader.n_blocks):
        block = reader.block_weights(index, dtype=None)
        for name in reader.arch.linear_names:
            rows, cols = block[f"{name}.weight"].shape
            size = special.get(name.rsplit(".", 1)[-1], group)
            total += rows * cols * bits + rows * math.ceil(cols / size) * 16
            weights += rows * cols
    return total / weights


def render(rows: list[dict]) -> None:
    lines = ["| model | tool | method | avg bits | perplexity (float) | quantization wall s | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["model"], -r["avg_bits"], r["tool"])):
        lines.append(f"| {row['model']} | {row['tool']} {row['tool_version']} | {row['method']} | {row['avg_bits']:.3f} | "
                     f"{row['ppl']:.3f} ({row['ppl_fp']:.3f}) | {row['wall_s']:.0f} | {row['peak_rss_mb']:.0f} |")
    (RESULTS / "peers.md").write_text("\n".join(lines) + "\n")
    plot = '''
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = json.load(open(sys.argv[1]))
models = sorted({r["model"] for r in rows})
fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
for ax, model in zip(axes[0], models):
    for tool in sorted({r["tool"] for r in rows if r["model"] == model}):
        for family in ("gptq", "ip"):
            pts = sorted((r["avg_bits"], r["ppl"]) for r in rows if r["model"] == model and r["tool"] == tool
                         and r["method"].startswith(family) and "refine" not in r["method"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{tool} {'uniform GPTQ' if family == 'gptq' else 'IP mixed precision'}")
        tuned = [(r["avg_bits"], r["ppl"]) for r in rows if r["model"] == model and r["tool"] == tool and "refine" in r["method"]]
        if tuned:
            ax.plot(*zip(*sorted(tuned)), marker="*", linestyle="none", markersize=12, label=f"{tool} + refine + norm tweak")
    fp = next(r["ppl_fp"] for r in rows if r["model"] == model)
    ax.axhline(fp, color="gray", linestyle=":", label="float")
    ax.set_yscale("log"); ax.set_xlabel("average bits per weight (scales counted)"); ax.set_ylabel("perplexity")
    ax.set_title(model); ax.legend(fontsize=8)
fig.tight_layout(); fig.savefig(sys.argv[2], dpi=110)
'''
    subprocess.run([str(PEERS_VENV / "bin" / "python"), "-c", plot, str(RESULTS / "peers.json"), str(RESULTS / "peers.png")], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--store", default=str(CACHE / "bench-store" / "peers"))
    parser.add_argument("--out-root", default=str(CACHE / "bench-out" / "peers"))
    args = parser.parse_args()
    python = ensure_peers_venv()
    version = peer_version(python)
    rows = load_rows("peers")
    chosen = args.models.split(",")
    if args.force:
        rows = [row for row in rows if row["model"] not in chosen]
    done = {(row["model"], row["tool"], row["method"]) for row in rows}
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    stamp = {"machine": machine(), "date": datetime.now(timezone.utc).date().isoformat(), "workers": 1}
    for name in chosen:
        spec = MODELS[name]
        model = spec["path"]()
        protocol = ["--calib", spec["calib"], "--eval", spec["eval"], "--nsamples", str(spec["nsamples"]), "--seqlen", str(spec["seqlen"]),
                    "--calib-selection", "first", "--eval-windows", str(spec["eval_windows"]), "--eval-seqlen", str(spec["eval_seqlen"]),
                    "--group-size", str(spec["group"])]
        common_row = {"bench": "peers", "model": name, "eval_text": Path(spec["eval"]).stem, "eval_windows": spec["eval_windows"],
                      "eval_seqlen": spec["eval_seqlen"], **stamp}
        # bench/gemma_methods.py runs the same protocol: its uncached measurements are reused
        shared = {row["case"]: row for row in load_rows("gemma_methods")} if name == "gemma-3-270m" else {}
        for label, flags in OURS[name]:
            if (name, "layerquant", label) in done:
                continue
            if label in shared:
                row = shared[label]
                rows.append({**common_row, "tool": "layerquant", "tool_version": row["tool_version"], "method": label, "avg_bits": row["avg_bits"],
                             "ppl": row["ppl"], "ppl_fp": row["ppl_fp"], "wall_s": row["wall_s"], "peak_rss_mb": row["peak_rss_mb"],
                             "source": "bench/results/gemma_methods.json"})
                write_rows("peers", rows)
                continue
            result = run_layerquant_case(f"{name}-{label}", ["--model", model, *protocol, *flags], args.store, args.out_root, env)
            report = result["report"]
            rows.append({**common_row, "tool": "layerquant", "tool_version": "0.1.0", "method": label, "avg_bits": report["avg_bits"],
                         "ppl": report["ppl_quant"], "ppl_fp": report["ppl_fp"], "wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_mb"]})
            write_rows("peers", rows)
            print(f"{name} layerquant {label}: {report['ppl_quant']:.3f} at {report['avg_bits']:.3f} bits", file=sys.stderr, flush=True)
        ppl_fp = our_eval(model, spec, args.store)["ppl"]
        for label, bits, group in spec["peer_cases"]:
            if (name, "llm-compressor", label) in done:
                continue
            with tempfile.TemporaryDirectory() as work:
                windows = Path(work) / "calib.safetensors"
                calibration_windows(spec, model, windows)
                out = Path(args.out_root) / f"{name}-llmcompressor-{label}"
                special = spec["peer_special"]
                measured = run_measured([str(python), str(HERE / "llmcompressor_case.py"), model, str(windows), str(out), str(bits), str(group),
                                         *[f"{k}={v}" for k, v in special.items()]])
            if measured["returncode"] != 0:
                raise RuntimeError(f"llm-compressor {name} {label} failed: {measured['stderr'][-3000:]}")
            ppl = our_eval(str(out), spec, args.store)["ppl"]
            rows.append({**common_row, "tool": "llm-compressor", "tool_version": version, "method": label,
                         "avg_bits": peer_avg_bits(model, bits, group, special), "ppl": ppl, "ppl_fp": ppl_fp,
                         "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"]})
            write_rows("peers", rows)
            print(f"{name} llm-compressor {label}: {ppl:.3f}", file=sys.stderr, flush=True)
    render(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
