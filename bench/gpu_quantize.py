"""Gemma 3 270M on a GPU: layerquant (`--device cuda`) and llm-compressor side by side, GPTQ w4 g128.

Run (a few minutes on one GPU; needs CUDA torch, and llm-compressor importable by --peer-python):
    python bench/gpu_quantize.py [--model DIR] [--peer-python PYTHON] [--nsamples 32] [--seqlen 512]

--model defaults to the folder bench/prepare_gemma.py builds. Where that folder cannot be had (a
machine with no registry access), --synthetic builds a random model with Gemma 3 270M's block
shapes (hidden 640, MLP 2048, 18 blocks, 4 heads x 256, 1 KV head) and the bundled 512-token
vocabulary: block timings are those of the real model, perplexities mean nothing then.
Calibration: the first nsamples x seqlen tokens of the bundled TinyStories text, the same token
windows for both tools. Writes bench/results/gpu_quantize.json (one row per tool).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import conditions, load_rows, machine, write_rows  # noqa: E402

HERE = Path(__file__).parent
PEER_CASE = HERE / "peers" / "llmcompressor_case.py"


def synthetic_gemma(folder: Path) -> str:
    """A random model with Gemma 3 270M's blocks and the bundled tokenizer (timings only)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from layerquant.config import default_model

    config = Gemma3TextConfig(vocab_size=512, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=256, sliding_window=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (Path(default_model()) / name).is_file():
            shutil.copy(Path(default_model()) / name, folder / name)
    return str(folder)


def calibration_windows(model: str, nsamples: int, seqlen: int, path: Path) -> None:
    """The token windows both tools calibrate on, as llmcompressor_case.py reads them."""
    from safetensors.torch import save_file

    from layerquant.config import default_calib
    from layerquant.infra.texts import load_tokenizer, read_text, tokenize
    from layerquant.solvers.windows import make_windows

    tokenizer = load_tokenizer(model)
    windows = make_windows(tokenize(tokenizer, read_text(default_calib())), nsamples, seqlen, tokenizer.bos_token_id, "first")
    save_file({"tokens": windows}, str(path))


def run_layerquant(model: str, args, work: Path) -> dict:
    command = [sys.executable, "-m", "layerquant.cli", "quantize", "--model", model, "--device", "cuda", "--bits", "4",
               "--group-size", "128", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib-selection", "first",
               "--eval-windows", "2", "--store", str(work / "store"), "--out", str(work / "layerquant"), "--pack-format", "dequantized"]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    report = json.loads((work / "layerquant" / "report.json").read_text())
    # quantization only: the report's wall time minus its evaluation passes
    quantize_s = report["wall_s"] - report["timing"]["seconds"]["evaluation"]
    return {"tool": "layerquant", "wall_s": round(quantize_s, 2), "process_wall_s": round(time.perf_counter() - started, 1),
            "timing": report["timing"], "forwards_per_block": report["forwards_per_block"], "ppl": report["ppl_quant"]}


def run_llmcompressor(model: str, args, work: Path, windows: Path) -> dict:
    command = [args.peer_python, str(PEER_CASE), "--model", model, "--out", str(work / "llmcompressor"), "--method", "gptq",
               "--windows", str(windows), "--bits", "4", "--group", "128"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    info = json.loads((work / "llmcompressor" / "llmcompressor.json").read_text())
    return {"tool": "llm-compressor", "tool_version": info["version"], "wall_s": info["seconds"],
            "process_wall_s": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Gemma 3 270M folder (default: bench/prepare_gemma.py's)")
    parser.add_argument("--synthetic", action="store_true", help="random weights with Gemma 3 270M's shapes (timings only)")
    parser.add_argument("--peer-python", default=sys.executable, help="a python that imports llmcompressor ('' skips it)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; this benchmark measures GPU quantization")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if args.synthetic:
            model = synthetic_gemma(work / "model")
        else:
            model = args.model or subprocess.run([sys.executable, str(HERE / "prepare_gemma.py")], check=True, stdout=subprocess.PIPE,
                                                 text=True).stdout.strip().splitlines()[-1]
        windows = work / "windows.safetensors"
        calibration_windows(model, args.nsamples, args.seqlen, windows)
        common = {"bench": "gpu_quantize", "model": "gemma-3-270m" + (" (synthetic)" if args.synthetic else ""), "method": "gptq",
                  "bits": 4, "group_size": 128, "calib": f"first {args.nsamples} x {args.seqlen} TinyStories tokens",
                  "machine": machine(), "gpu": torch.cuda.get_device_name(0)}
        rows = load_rows("gpu_quantize")
        for run in (lambda: run_layerquant(model, args, work),) + ((lambda: run_llmcompressor(model, args, work, windows),)
                                                                      if args.peer_python else ()):
            at_start = conditions()
            row = {**common, **at_start, **run(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            rows.append(row)
            write_rows("gpu_quantize", rows)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
