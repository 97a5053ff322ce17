"""Gemma 3 270M: what 3- and 4-bit activations and KV caches cost on their own, with float weights
(rotated as the weight-activation runs are), on the windows of bench/gemma_bisup.py: the floor that
no weight quantizer or fine-tuning of the weights starts below.

Run: .venv/bin/python bench/gemma_runtime_floor.py   (about 5 minutes on 2 idle cores)
Writes bench/results/gemma_runtime_floor.json: perplexity on the first 6 BOS-prefixed 2048-token
WikiText-2 test windows (float 17.507) with A3, KV3, A3 + KV3 and A4 + KV4, each with 128-channel
groups (BiSup's "-g128": 128 input channels per activation scale, 128 head channels per KV scale).
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import commit, conditions, machine, write_rows  # noqa: E402
from gemma_bisup import EVAL, EVAL_SEQLEN, EVAL_WINDOWS, GROUP  # noqa: E402
from run_all import gemma_folder  # noqa: E402
from support.runtime_model import open_model, plan, quantize_run, run_perplexity, text_windows  # noqa: E402

from layerquant.runtime_quant import FLOAT_BITS, RuntimeQuant  # noqa: E402

# (activation bits, KV bits), 16 = float
SETTINGS = ((3, FLOAT_BITS), (FLOAT_BITS, 3), (3, 3), (4, 4))


def main() -> None:
    reader, tokenizer = open_model(gemma_folder())
    windows = text_windows(tokenizer, str(EVAL), EVAL_WINDOWS, EVAL_SEQLEN)
    rows = []
    for act_bits, kv_bits in SETTINGS:
        start = time.perf_counter()
        model = plan(reader, RuntimeQuant(act_bits=act_bits, act_group_size=GROUP, kv_bits=kv_bits, kv_group_size=GROUP, rotate=True))
        ppl = run_perplexity(reader, model, quantize_run(reader, model, None, None), windows)
        rows.append({"bench": "gemma_runtime_floor", "model": "gemma-3-270m", "w_bits": FLOAT_BITS, "a_bits": act_bits,
                     "kv_bits": kv_bits, "group_size": GROUP, "rotate": True, "eval_windows": EVAL_WINDOWS, "eval_seqlen": EVAL_SEQLEN,
                     "ppl": ppl, "seconds": round(time.perf_counter() - start, 1),
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(), "machine": machine(),
                     **conditions()})
        print(f"W16A{act_bits}KV{kv_bits} g{GROUP} rotated: {ppl:.3f}", flush=True)
    print(write_rows("gemma_runtime_floor", rows))


if __name__ == "__main__":
    main()
