"""stories260K: weight-activation quantization (issue 16): W4A16 / W4A8 / W4A4 / W3A3, with and
without QuaRot rotation or SmoothQuant migration, and 4- and 3-bit KV caches with and without BiSup's float prompt cache.

Run: .venv/bin/python bench/stories_bisup.py   (about 12 minutes on 2 busy cores)
Writes bench/results/stories_bisup.json.

The solver calls of a run, composed without Prefect (tests/support/runtime_model.py; a CLI run
with the same settings gives the same perplexity: see notes in the README section):
128 random calibration windows x 256 (the run defaults, seed 0), GPTQ g32 with the run-time
hooks active while calibrating. "ppl": the first 40 evaluation windows x 256 (the run default).
"cont_ppl": 40 windows of one shared 64-token prompt (BOS + the eval text's first 63 tokens) and
a 192-token continuation, scored on the continuations only; the same windows for every row.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from layerquant.config import default_calib, default_eval, default_model  # noqa: E402
from layerquant.runtime_quant import RuntimeQuant  # noqa: E402
from layerquant.specs import QuantSpec  # noqa: E402
from support.runtime_model import continuation_windows, open_model, plan, quantize_run, run_perplexity, text_windows  # noqa: E402

PROMPT = 64


def main() -> int:
    torch.set_num_threads(1)
    reader, tokenizer = open_model(default_model())
    calib = text_windows(tokenizer, default_calib(), 128, 256, "random")
    plain = text_windows(tokenizer, default_eval(), 40, 256)
    continuation = continuation_windows(tokenizer, default_eval(), 40, PROMPT, 256 - PROMPT)
    cases = [(16, 16, 16)] + [(4, 16, 16), (4, 8, 16), (4, 4, 16), (3, 3, 16), (4, 4, 4), (3, 3, 3), (16, 16, 4), (16, 16, 3)]
    rows = []
    for w_bits, a_bits, kv_bits in cases:
        for transform in ("none", "rotate", "smooth"):
            for prompt in ((0, PROMPT) if kv_bits < 16 else (0,)):
                if (w_bits == 16 and a_bits == 16 and kv_bits == 16 and transform != "none") or (w_bits == 16 and transform == "smooth"):
                    continue  # both keep the float model's function (tests/test_runtime_quant.py)
                start = time.perf_counter()
                settings = RuntimeQuant(act_bits=a_bits, kv_bits=kv_bits, prompt_kv_tokens=prompt, rotate=transform == "rotate",
                                        smooth=transform == "smooth")
                model = plan(reader, settings)
                spec = QuantSpec(bits=w_bits, group_size=32) if w_bits < 16 else None
                blocks = quantize_run(reader, model, calib, spec)
                row = {"bench": "stories_bisup", "model": "stories260K", "w_bits": w_bits, "a_bits": a_bits, "kv_bits": kv_bits,
                       "rotate": transform == "rotate", "smooth": transform == "smooth", "prompt_kv_tokens": prompt, "method": "gptq" if spec else "float", "group_size": 32,
                       "nsamples": 128, "eval_windows": 40, "eval_seqlen": 256}
                if kv_bits == 16:
                    row["ppl"] = run_perplexity(reader, model, blocks, plain)
                row["cont_ppl"] = run_perplexity(reader, model, blocks, continuation, score_from=PROMPT)
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / "stories_bisup.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
