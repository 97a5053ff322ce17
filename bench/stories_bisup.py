"""stories260K: weight-activation quantization (issue 16): W4A16 / W4A8 / W4A4 / W3A3, with and
without QuaRot rotation or SmoothQuant migration, and 4- and 3-bit KV caches with and without BiSup's float prompt cache.

Run: .venv/bin/python bench/stories_bisup.py   (about 12 minutes on 2 busy cores)
     .venv/bin/python bench/stories_bisup.py --tuning   (only the fine-tuning rows, ~25 minutes)
     .venv/bin/python bench/stories_bisup.py --token-clip-search   (the rows below 8 bits again, with
     RuntimeQuant.token_clip_search; rows marked "token_clip_search": true)
Writes bench/results/stories_bisup.json; a run replaces the rows it measures and keeps the others.

Fine-tuning rows (BiSup's quantization-aware PEFT, rotated, W{b}A{b}): block tuning 50 scale
refinement + 50 norm tweaking steps in the residual space (held-out best iterate), alone, with
rank-r low-rank corrections per linear (float16 factors, counted in avg_bits), with trained
activation clipping ratios, and both; W4A3 with the ratios as the reference at about the bits
W3A3 + rank-2 corrections cost.

The solver calls of a run, composed without Prefect (tests/support/runtime_model.py; a CLI run
with the same settings gives the same perplexity: see notes in the README section):
128 random calibration windows x 256 (the run defaults, seed 0), GPTQ g32 with the run-time
hooks active while calibrating. "ppl": the first 40 evaluation windows x 256 (the run default).
"cont_ppl": 40 windows of one shared 64-token prompt (BOS + the eval text's first 63 tokens) and
a 192-token continuation, scored on the continuations only; the same windows for every row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from layerquant.config import default_calib, default_eval, default_model  # noqa: E402
from layerquant.runtime_quant import RuntimeQuant  # noqa: E402
from layerquant.specs import QuantSpec  # noqa: E402
from layerquant.tuning import BlockTuning  # noqa: E402
from support.runtime_model import (  # noqa: E402
    continuation_windows,
    open_model,
    plan,
    quantize_run,
    quantize_run_artifacts,
    run_perplexity,
    text_windows,
)

PROMPT = 64
RESULTS = Path(__file__).parent / "results" / "stories_bisup.json"
KEY_FIELDS = ("w_bits", "a_bits", "kv_bits", "rotate", "smooth", "prompt_kv_tokens", "tuning", "token_clip_search")
# (weight bits, activation bits, low-rank rank, trained clipping ratios)
TUNING_CASES = [(4, 4, 0, False), (4, 4, 2, False), (4, 4, 0, True), (4, 4, 2, True),
                (3, 3, 0, False), (3, 3, 1, False), (3, 3, 2, False), (3, 3, 0, True), (3, 3, 2, True),
                (4, 3, 0, True)]


def row_key(row: dict) -> tuple:
    return tuple(json.dumps(row.get(name), sort_keys=True) for name in KEY_FIELDS)


def merge(rows: list[dict]) -> None:
    """Write `rows` into the results file, replacing rows of the same setting, keeping the rest."""
    kept = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    new = {row_key(row) for row in rows}
    RESULTS.write_text(json.dumps([row for row in kept if row_key(row) not in new] + rows, indent=1) + "\n")


def tuning_rows(reader, calib, plain) -> list[dict]:
    rows = []
    for w_bits, a_bits, rank, act_clip in TUNING_CASES:
        start = time.perf_counter()
        model = plan(reader, RuntimeQuant(act_bits=a_bits, rotate=True))
        tuning = BlockTuning(refine_steps=50, norm_tweak_steps=50, space="residual", lowrank_rank=rank, act_clip=act_clip)
        artifacts, blocks = quantize_run_artifacts(reader, model, calib, QuantSpec(bits=w_bits, group_size=32), tuning)
        records = [record for artifact in artifacts for record in artifact.layers]
        row = {"bench": "stories_bisup", "model": "stories260K", "w_bits": w_bits, "a_bits": a_bits, "kv_bits": 16, "rotate": True,
               "smooth": False, "prompt_kv_tokens": 0, "method": "gptq", "group_size": 32, "nsamples": 128, "eval_windows": 40,
               "eval_seqlen": 256, "tuning": tuning.identity(),
               "avg_bits": sum(r.stats["storage_bits"] for r in records) / sum(r.stats["n_weights"] for r in records),
               "ppl": run_perplexity(reader, model, blocks, plain), "seconds": round(time.perf_counter() - start, 1)}
        clips = [float(v) for artifact in artifacts for k, v in artifact.overrides.items() if k.endswith(".act_clip")]
        if clips:
            row["act_clip_range"] = [round(min(clips), 3), round(max(clips), 3)]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tuning", action="store_true", help="measure only the fine-tuning rows")
    parser.add_argument("--token-clip-search", action="store_true", help="measure the rows below 8 bits with the token clipping search")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reader, tokenizer = open_model(default_model())
    calib = text_windows(tokenizer, default_calib(), 128, 256, "random")
    plain = text_windows(tokenizer, default_eval(), 40, 256)
    if args.tuning:
        merge(tuning_rows(reader, calib, plain))
        return 0
    continuation = continuation_windows(tokenizer, default_eval(), 40, PROMPT, 256 - PROMPT)
    cases = [(16, 16, 16)] + [(4, 16, 16), (4, 8, 16), (4, 4, 16), (3, 3, 16), (4, 4, 4), (3, 3, 3), (16, 16, 4), (16, 16, 3)]
    rows = []
    for w_bits, a_bits, kv_bits in cases:
        for transform in ("none", "rotate", "smooth"):
            for prompt in ((0, PROMPT) if kv_bits < 16 else (0,)):
                if (w_bits == 16 and a_bits == 16 and kv_bits == 16 and transform != "none") or (w_bits == 16 and transform == "smooth"):
                    continue  # both keep the float model's function (tests/test_runtime_quant.py)
                if args.token_clip_search and min(a_bits, kv_bits) >= 8:
                    continue  # nothing below 8 bits to search
                start = time.perf_counter()
                settings = RuntimeQuant(act_bits=a_bits, kv_bits=kv_bits, prompt_kv_tokens=prompt, rotate=transform == "rotate",
                                        smooth=transform == "smooth", token_clip_search=args.token_clip_search)
                model = plan(reader, settings)
                spec = QuantSpec(bits=w_bits, group_size=32) if w_bits < 16 else None
                blocks = quantize_run(reader, model, calib, spec)
                row = {"bench": "stories_bisup", "model": "stories260K", "w_bits": w_bits, "a_bits": a_bits, "kv_bits": kv_bits,
                       "rotate": transform == "rotate", "smooth": transform == "smooth", "prompt_kv_tokens": prompt, "method": "gptq" if spec else "float", "group_size": 32,
                       "nsamples": 128, "eval_windows": 40, "eval_seqlen": 256}
                if args.token_clip_search:
                    row["token_clip_search"] = True
                if kv_bits == 16:
                    row["ppl"] = run_perplexity(reader, model, blocks, plain)
                row["cont_ppl"] = run_perplexity(reader, model, blocks, continuation, score_from=PROMPT)
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    merge(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
