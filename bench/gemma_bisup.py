"""Gemma 3 270M: weight-activation quantization (issue 16): W4A16, W4A8, W4A4KV4 and W3A3KV3, with
and without QuaRot rotation (or SmoothQuant migration), BiSup's fine-tuning and its float prompt cache.

Run: .venv/bin/python bench/gemma_bisup.py [--cases a,b] [--force]
(on 2 cores: 2-4 minutes per untuned case without a quantized cache, 15-25 with one, 40-100 with
tuning; finished cases are kept and skipped)
Writes bench/results/gemma_bisup.json, one row per case, each with the load average at its start.

Protocol: the peers' Gemma protocol (bench/peers/run_all.py): calibration = the first 32 x 512
tokens of the WikiText-2 validation tokens, GPTQ g128 with the run-time hooks (rotations, activation
and cache fake-quantization) active while calibrating; "ppl" = the first 6 BOS-prefixed 2048-token
windows of the WikiText-2 test set. Cases with a quantized KV cache also get "cont_ppl": 6 windows of
one shared 64-token prompt (BOS + the test text's first 63 tokens) before a 1984-token continuation,
scored on the continuations only, with the whole cache quantized ("cont_ppl") and with the prompt's
keys and values computed by the float model and kept float ("cont_ppl_float_prompt": BiSup's
prompt-precision cache, as the validation runs it) on the same quantized weights and windows;
"cont_ppl_own_prompt": the quantized model's own prompt states kept float (rows before 2026-12-04
evening measured this as "cont_ppl_float_prompt"). The same continuations each after the 63 test-text
tokens right before it instead of the shared prompt (solvers.windows.context_windows,
--prompt-kv-eval own-context; rows from 2026-12-05 afternoon on): "cont_own_ppl" (whole cache
quantized; for the float case, the float model) and "cont_own_ppl_float_prompt" (each window's prompt
cache from the float model, kept float); "cont_ppl_float_bos": the shared-prompt continuations with only
BOS's keys and values from the float model, kept float (prompt_kv_tokens=1; IntactKV's pivot token);
"ppl_float_bos" (rows from 2026-12-05 evening on): "ppl"'s windows with the same (every window starts
with BOS, so this is the plain perplexity of a model served with BOS's cache entry precomputed in
float). The solver calls are those of a run, composed without Prefect (tests/support/runtime_model.py,
as bench/stories_bisup.py does).

Tuning ("+tune"): BiSup's quantization-aware fine-tuning with the quantizers in the loop, block by
block: 50 scale-refinement steps with trained activation clipping ratios, then 50 norm-tweaking
steps, in the next-norm space (the run default for Gemma), held-out best iterate.

llm-compressor ("llm-compressor-..." cases, its own venv, bench/peers/llmcompressor_case.py): GPTQ
with dynamic per-token int activations (its W4A8 / W4A4 schemes), alone or after its
SmoothQuantModifier, fed the same calibration windows; its rotations (QuIP / SpinQuant modifiers)
know Llama only. Its fake-quantized weights are measured by the same evaluator with the same
per-token activation quantization (no KV cache quantization: its cache scheme is static).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import commit, conditions, load_rows, machine, write_rows  # noqa: E402
from support.runtime_model import (  # noqa: E402
    continuation_windows,
    open_model,
    own_context_windows,
    plan,
    quantize_run,
    quantize_run_artifacts,
    run_perplexity,
    text_windows,
)

from layerquant.runtime_quant import RuntimeQuant  # noqa: E402
from layerquant.specs import QuantSpec  # noqa: E402
from layerquant.tuning import BlockTuning  # noqa: E402

DATA = HERE / "data"
CALIB, EVAL = DATA / "wikitext2_valid_tokens.txt", DATA / "wikitext2_test_gptq_join.txt"
NSAMPLES, SEQLEN, EVAL_WINDOWS, EVAL_SEQLEN, GROUP, PROMPT = 32, 512, 6, 2048, 128, 64
RESULTS = "gemma_bisup"
TUNING = BlockTuning(refine_steps=50, norm_tweak_steps=50, act_clip=True)


def case(w_bits: int, a_bits: int, kv_bits: int, transform: str = "none", tuned: bool = False, act_group: int = 0,
         clip_search: bool = False) -> tuple[str, dict]:
    """`act_group`: input channels per activation scale and head channels per KV scale (BiSup's
    "W3A3-g128"); 0 = one scale per token (and head). `clip_search` ("+clip"): RuntimeQuant.token_clip_search."""
    name = "float" if w_bits == 16 else f"w{w_bits}a{a_bits}" + (f"kv{kv_bits}" if kv_bits < 16 else "")
    name += f"-g{act_group}" if act_group else ""
    name += "" if transform == "none" else f"+{transform}"
    name += "+clip" if clip_search else ""
    name += "+tune" if tuned else ""
    settings = {"w_bits": w_bits, "a_bits": a_bits, "kv_bits": kv_bits, "transform": transform, "tuned": tuned, "act_group": act_group}
    return name, settings | ({"clip_search": True} if clip_search else {})


# in the order they are worth running: the four settings plain and rotated first
CASES = dict([
    case(16, 16, 16),
    case(4, 16, 16), case(4, 8, 16), case(4, 8, 16, "rotate"),
    case(4, 4, 4), case(4, 4, 4, "rotate"), case(3, 3, 3), case(3, 3, 3, "rotate"),
    case(4, 4, 4, "rotate", True), case(3, 3, 3, "rotate", True),
    case(4, 16, 16, "rotate"), case(4, 8, 16, "smooth"), case(4, 4, 4, "smooth"), case(3, 3, 3, "smooth"),
    case(4, 8, 16, "rotate", True),
    case(4, 4, 4, "rotate", act_group=128), case(3, 3, 3, "rotate", act_group=128), case(3, 3, 3, "rotate", True, act_group=128),
    case(4, 4, 4, "rotate", True, act_group=128),
    case(3, 3, 3, "rotate", act_group=128, clip_search=True), case(4, 4, 4, "rotate", act_group=128, clip_search=True),
    case(3, 3, 3, "rotate", True, act_group=128, clip_search=True), case(4, 4, 4, "rotate", True, act_group=128, clip_search=True),
])


def peer_case(a_bits: int, smooth: bool) -> tuple[str, dict]:
    return f"llm-compressor-w4a{a_bits}" + ("+smooth" if smooth else ""), {"w_bits": 4, "a_bits": a_bits, "kv_bits": 16,
                                                                           "transform": "smooth" if smooth else "none", "tuned": False}


PEER_CASES = dict([peer_case(8, False), peer_case(4, False), peer_case(8, True), peer_case(4, True)])


def base_row(name: str, settings: dict, tool: str) -> dict:
    return {"bench": RESULTS, "model": "gemma-3-270m", "case": name, "tool": tool, **settings,
            "method": "gptq" if settings["w_bits"] < 16 else "float", "group_size": GROUP, "calib": f"first {NSAMPLES} x {SEQLEN}",
            "eval_windows": EVAL_WINDOWS, "eval_seqlen": EVAL_SEQLEN, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "machine": machine(), **conditions()}


def measure_peer(name: str, settings: dict, model_dir: str, calib, plain, scratch: Path) -> dict:
    """llm-compressor's GPTQ (+ SmoothQuant) in its venv on the same windows; its weights
    evaluated with the same per-token activation quantization as ours."""
    from run_all import ensure_peers_venv

    from safetensors.torch import save_file

    row = base_row(name, settings, "llm-compressor")
    scratch.mkdir(parents=True, exist_ok=True)
    windows, out = scratch / "calib-windows.safetensors", scratch / name
    if out.exists() or windows.exists():  # removed after measuring: never a folder this script did not write
        raise SystemExit(f"{out} or {windows} already exists: pass a --scratch folder only this benchmark uses")
    save_file({"tokens": calib.contiguous()}, str(windows))
    command = [str(ensure_peers_venv()), str(HERE / "peers" / "llmcompressor_case.py"), "--model", model_dir, "--out", str(out),
               "--method", "gptq", "--bits", str(settings["w_bits"]), "--group", str(GROUP), "--act-bits", str(settings["a_bits"]),
               "--windows", str(windows), *(["--smooth"] if settings["transform"] == "smooth" else [])]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        row["quantize_s"] = round(time.perf_counter() - start, 1)
        if result.returncode != 0:
            row["error"] = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
            return row
        row["tool_version"] = json.loads((out / "llmcompressor.json").read_text())["version"]
        peer_reader, _ = open_model(str(out))
        # the peer's smoothing is folded into its weights and norms: only the activation quantizer is ours
        model = plan(peer_reader, RuntimeQuant(act_bits=settings["a_bits"]))
        blocks = [model.block_weights(peer_reader.block_weights(index)) for index in range(peer_reader.n_blocks)]
        row["ppl"] = run_perplexity(peer_reader, model, blocks, plain)
        row["seconds"] = round(time.perf_counter() - start, 1)
        return row
    finally:  # only what this case wrote
        shutil.rmtree(out, ignore_errors=True)
        windows.unlink(missing_ok=True)


def measure(name: str, settings: dict, reader, calib, plain, continuation, own_context) -> dict:
    row = base_row(name, settings, "layerquant")
    start = time.perf_counter()
    group = settings.get("act_group", 0)
    runtime = RuntimeQuant(act_bits=settings["a_bits"], kv_bits=settings["kv_bits"], act_group_size=group, kv_group_size=group,
                           rotate=settings["transform"] == "rotate", smooth=settings["transform"] == "smooth",
                           token_clip_search=settings.get("clip_search", False))
    model = plan(reader, runtime)
    spec = QuantSpec(bits=settings["w_bits"], group_size=GROUP) if settings["w_bits"] < 16 else None
    if settings["tuned"]:
        row["tuning"] = TUNING.identity()
        artifacts, blocks = quantize_run_artifacts(reader, model, calib, spec, TUNING)
        records = [record for artifact in artifacts for record in artifact.layers]
        row["avg_bits"] = sum(r.stats["storage_bits"] for r in records) / sum(r.stats["n_weights"] for r in records)
    else:
        blocks = quantize_run(reader, model, calib, spec)
    row["quantize_s"] = round(time.perf_counter() - start, 1)
    row["ppl"] = run_perplexity(reader, model, blocks, plain)
    # only BOS (the attention sink) from the float model, kept float: IntactKV's pivot token
    bos_model = plan(reader, dataclasses.replace(runtime, prompt_kv_tokens=1)) if settings["kv_bits"] < 16 else None
    if bos_model is not None:  # the same windows
        row["ppl_float_bos"] = run_perplexity(reader, bos_model, blocks, plain)
    if settings["kv_bits"] < 16 or settings["w_bits"] == 16:
        row["cont_ppl"] = run_perplexity(reader, model, blocks, continuation, score_from=PROMPT)
        row["cont_own_ppl"] = run_perplexity(reader, model, blocks, own_context, score_from=PROMPT)
    if settings["kv_bits"] < 16:  # the same weights and windows, the prompt's keys and values float
        prompt_model = plan(reader, dataclasses.replace(runtime, prompt_kv_tokens=PROMPT))
        row["cont_ppl_float_prompt"] = run_perplexity(reader, prompt_model, blocks, continuation, score_from=PROMPT)
        # the quantized model's own prompt states, kept float (what "float prompt" meant before 2026-12-04 evening)
        row["cont_ppl_own_prompt"] = run_perplexity(reader, prompt_model, blocks, continuation, score_from=PROMPT, float_prompt=False)
        row["cont_own_ppl_float_prompt"] = run_perplexity(reader, prompt_model, blocks, own_context, score_from=PROMPT)
        row["cont_ppl_float_bos"] = run_perplexity(reader, bos_model, blocks, continuation, score_from=PROMPT)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join([*CASES, *PEER_CASES])}")
    parser.add_argument("--force", action="store_true", help="re-measure the chosen cases even if the results have them")
    parser.add_argument("--scratch", type=Path, default=Path.home() / ".cache" / "layerquant" / "gemma_bisup",
                        help="where llm-compressor's outputs are written (each removed after it is measured)")
    args = parser.parse_args()
    everything = {**CASES, **PEER_CASES}
    chosen = args.cases.split(",") if args.cases else list(everything)
    unknown = [name for name in chosen if name not in everything]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(everything)}")
    sys.path.insert(0, str(HERE / "peers"))
    from run_all import gemma_folder

    rows = load_rows(RESULTS)
    done = {row["case"] for row in rows}
    todo = [name for name in chosen if args.force or name not in done]
    if not todo:
        print("all chosen cases are measured; --force re-measures them")
        return 0
    model_dir = gemma_folder()
    reader, tokenizer = open_model(model_dir)
    calib = text_windows(tokenizer, str(CALIB), NSAMPLES, SEQLEN)
    plain = text_windows(tokenizer, str(EVAL), EVAL_WINDOWS, EVAL_SEQLEN)
    continuation = continuation_windows(tokenizer, str(EVAL), EVAL_WINDOWS, PROMPT, EVAL_SEQLEN - PROMPT)
    own_context = own_context_windows(tokenizer, str(EVAL), EVAL_WINDOWS, PROMPT, EVAL_SEQLEN - PROMPT)
    for name in todo:
        if name in PEER_CASES:
            row = measure_peer(name, PEER_CASES[name], model_dir, calib, plain, args.scratch)
        else:
            row = measure(name, CASES[name], reader, calib, plain, continuation, own_context)
        rows = [r for r in load_rows(RESULTS) if r["case"] != name] + [row]
        write_rows(RESULTS, rows)  # after every case: an interrupted run keeps what it measured
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
