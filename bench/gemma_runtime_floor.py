"""Gemma 3 270M: what 3- and 4-bit activations and KV caches cost on their own, with float weights
(rotated as the weight-activation runs are), on the windows of bench/gemma_bisup.py: the floor that
no weight quantizer or fine-tuning of the weights starts below.

Run: .venv/bin/python bench/gemma_runtime_floor.py [--token-clip-search]
(3-4 minutes a setting on 2 cores, up to twice that
with the search beside other work)
Writes bench/results/gemma_runtime_floor.json: perplexity on the first 6 BOS-prefixed 2048-token
WikiText-2 test windows (float 17.507) with A3, KV3, A3 + KV3 and A4 + KV4, each with 128-channel
groups (BiSup's "-g128": 128 input channels per activation scale, 128 head channels per KV scale).
With --token-clip-search the same settings with RuntimeQuant.token_clip_search (rows replaced by
setting and search; the other rows kept), each row also counting how often every clipping ratio
was chosen, for activation tokens ("act") and cache entries ("kv").
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import commit, conditions, load_rows, machine, write_rows  # noqa: E402
from gemma_bisup import EVAL, EVAL_SEQLEN, EVAL_WINDOWS, GROUP  # noqa: E402
from run_all import gemma_folder  # noqa: E402
from support.runtime_model import open_model, plan, quantize_run, run_perplexity, text_windows  # noqa: E402

import layerquant.solvers.activations as activations  # noqa: E402
from layerquant.runtime_quant import CLIP_SEARCH_RATIOS, FLOAT_BITS, RuntimeQuant  # noqa: E402

# (activation bits, KV bits), 16 = float
SETTINGS = ((3, FLOAT_BITS), (FLOAT_BITS, 3), (3, 3), (4, 4))


def counting_chosen_ratios(counts: dict[str, Counter]):
    """The search, wrapped to count the ratio each row chose into counts["act"] or counts["kv"],
    by which quantizer called it: `tagged(function, kind)` wraps the activation (symmetric) or
    cache (asymmetric) quantizer to say so."""
    search = activations._least_error_ratio
    current = {"kind": "act"}

    def counted(groups, rounded):
        ratios = search(groups, rounded)
        counts[current["kind"]].update(round(float(r), 2) for r in ratios.flatten().tolist())
        return ratios

    def tagged(function, kind):
        def run(*args, **kwargs):
            current["kind"] = kind
            return function(*args, **kwargs)
        return run

    return counted, tagged


def main() -> None:
    searched = "--token-clip-search" in sys.argv[1:]
    reader, tokenizer = open_model(gemma_folder())
    windows = text_windows(tokenizer, str(EVAL), EVAL_WINDOWS, EVAL_SEQLEN)
    kept = [row for row in load_rows("gemma_runtime_floor") if bool(row.get("token_clip_search")) != searched]
    rows = []
    original = activations._least_error_ratio, activations.fake_quant_symmetric, activations.fake_quant_asymmetric
    for act_bits, kv_bits in SETTINGS:
        start = time.perf_counter()
        counts = {"act": Counter(), "kv": Counter()}
        if searched:  # the module looks these up at call time: wrapped for this run only
            counted, tagged = counting_chosen_ratios(counts)
            activations._least_error_ratio = counted
            activations.fake_quant_symmetric = tagged(original[1], "act")
            activations.fake_quant_asymmetric = tagged(original[2], "kv")
        try:
            model = plan(reader, RuntimeQuant(act_bits=act_bits, act_group_size=GROUP, kv_bits=kv_bits, kv_group_size=GROUP, rotate=True,
                                              token_clip_search=searched))
            ppl = run_perplexity(reader, model, quantize_run(reader, model, None, None), windows)
        finally:
            activations._least_error_ratio, activations.fake_quant_symmetric, activations.fake_quant_asymmetric = original
        row = {"bench": "gemma_runtime_floor", "model": "gemma-3-270m", "w_bits": FLOAT_BITS, "a_bits": act_bits,
               "kv_bits": kv_bits, "group_size": GROUP, "rotate": True, "eval_windows": EVAL_WINDOWS, "eval_seqlen": EVAL_SEQLEN,
               "ppl": ppl, "seconds": round(time.perf_counter() - start, 1),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(), "machine": machine(),
               **conditions()}
        if searched:
            row["token_clip_search"] = list(CLIP_SEARCH_RATIOS)
            row["chosen_ratio_share"] = {kind: {str(r): round(n / total, 4) for r, n in sorted(c.items(), reverse=True)}
                                         for kind, c in counts.items() if (total := sum(c.values()))}
        rows.append(row)
        print(f"W16A{act_bits}KV{kv_bits} g{GROUP} rotated{' searched' if searched else ''}: {ppl:.3f}", flush=True)
        write_rows("gemma_runtime_floor", kept + rows)  # after every setting: an interrupted run keeps what it measured
    print("wrote bench/results/gemma_runtime_floor.json")


if __name__ == "__main__":
    main()
