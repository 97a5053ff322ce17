"""Phases of a measured run, for commands whose run includes an evaluation that the
quantization time and memory must not count (layerquant's `quantize` evaluates the float and the
quantized model before it exits; llm-compressor's run does not evaluate at all).

The run is measured by bench/common.py's run_measured, which time-stamps every stderr line and
memory sample, so the phase delimited by log lines can be cut out afterwards.
"""
from __future__ import annotations

import re


# the first line the evaluation writes: the float pass's own line when it ran the blocks or read
# the stored pass (it is written after that work, so the phase starts at the line before it),
# else the float perplexity line
EVAL_FIRST = re.compile(r"float model .*: evaluat|float perplexity [0-9.]+")
QUANT_DONE = re.compile(r"quant perplexity [0-9.]+")


def layerquant_phases(measured: dict) -> dict:
    """Split a `layerquant quantize` run (as `run_measured` returns it) into quantization and evaluation.

    The evaluation starts after the log line that precedes the evaluation's first line ("float
    model ...: evaluated / evaluation ... read from the store", or "float perplexity ...": the
    last block's task finishing) and ends with the last "quant perplexity ..." (and its KL line); everything else (imports,
    Prefect's temporary server, calibration, scoring, blocks, export) is quantization time.
    Returns quant_wall_s, eval_wall_s and the peak tree RSS outside / inside the evaluation."""
    lines = measured["stderr_lines"]
    float_at = next((i for i, (_, text) in enumerate(lines) if EVAL_FIRST.search(text)), None)
    # the last one: with several evaluation texts, each text's float and quantized passes follow the blocks
    quant_at = next((i for i, (_, text) in reversed(list(enumerate(lines))) if QUANT_DONE.search(text)), None)
    if float_at is None or quant_at is None or float_at == 0:
        return {"quant_wall_s": measured["wall_s"], "eval_wall_s": None, "quant_peak_rss_mb": measured["peak_rss_mb"],
                "eval_peak_rss_mb": None}
    begin, end = lines[float_at - 1][0], lines[quant_at][0]
    inside = [mb for t, mb in measured["samples"] if begin <= t <= end]
    outside = [mb for t, mb in measured["samples"] if not begin <= t <= end]
    return {"quant_wall_s": round(measured["wall_s"] - (end - begin), 2), "eval_wall_s": round(end - begin, 2),
            "quant_peak_rss_mb": round(max(outside, default=0.0), 1), "eval_peak_rss_mb": round(max(inside, default=0.0), 1)}
