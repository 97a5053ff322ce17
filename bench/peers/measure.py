"""Process-tree measurement with phases, for commands whose run includes an evaluation that the
quantization time and memory must not count (layerquant's `quantize` evaluates the float and the
quantized model before it exits; llm-compressor's run does not evaluate at all).

Same sampler as bench/common.py's run_measured (summed RSS of the whole process tree), but
stderr is read line by line as it arrives and every line is time-stamped, and every memory
sample is kept, so a phase delimited by log lines can be cut out afterwards.
"""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import _rss_mb, _tree_pids  # noqa: E402  (the sampler run_measured uses)


def run_streamed(command: list[str], env: dict[str, str] | None = None, interval: float = 0.1, echo=None) -> dict:
    """Run `command`; returns wall_s, peak tree RSS, return code, stdout, the stderr lines as
    (seconds since start, text) and the memory samples as (seconds since start, tree MB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    samples: list[tuple[float, float]] = []
    lines: list[tuple[float, str]] = []
    out: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - start, sum(_rss_mb(p) for p in _tree_pids(process.pid))))
            time.sleep(interval)

    def drain_stdout() -> None:
        out.append(process.stdout.read())

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=drain_stdout, daemon=True)]
    for thread in threads:
        thread.start()
    for line in process.stderr:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
        if echo is not None:
            echo(line.rstrip("\n"))
    process.wait()
    done.set()
    for thread in threads:
        thread.join()
    return {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(max((mb for _, mb in samples), default=0.0), 1),
            "returncode": process.returncode, "stdout": "".join(out), "stderr_lines": lines, "samples": samples}


FLOAT_DONE = re.compile(r"float perplexity [0-9.]+")
QUANT_DONE = re.compile(r"quant perplexity [0-9.]+")


def layerquant_phases(measured: dict) -> dict:
    """Split a `layerquant quantize` run into quantization and evaluation.

    The evaluation starts after the log line that precedes "float perplexity ..." (the last
    block's task finishing) and ends with "quant perplexity ..."; everything else (imports,
    Prefect's temporary server, calibration, scoring, blocks, export) is quantization time.
    Returns quant_wall_s, eval_wall_s and the peak tree RSS outside / inside the evaluation."""
    lines = measured["stderr_lines"]
    float_at = next((i for i, (_, text) in enumerate(lines) if FLOAT_DONE.search(text)), None)
    quant_at = next((i for i, (_, text) in enumerate(lines) if QUANT_DONE.search(text)), None)
    if float_at is None or quant_at is None or float_at == 0:
        return {"quant_wall_s": measured["wall_s"], "eval_wall_s": None, "quant_peak_rss_mb": measured["peak_rss_mb"],
                "eval_peak_rss_mb": None}
    begin, end = lines[float_at - 1][0], lines[quant_at][0]
    inside = [mb for t, mb in measured["samples"] if begin <= t <= end]
    outside = [mb for t, mb in measured["samples"] if not begin <= t <= end]
    return {"quant_wall_s": round(measured["wall_s"] - (end - begin), 2), "eval_wall_s": round(end - begin, 2),
            "quant_peak_rss_mb": round(max(outside, default=0.0), 1), "eval_peak_rss_mb": round(max(inside, default=0.0), 1)}
