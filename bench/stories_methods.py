"""stories260K: RTN vs GPTQ at 8/4/3/2 bits on the llm-compressor reference protocol.

Run: .venv/bin/python bench/stories_methods.py   (about 2 minutes on 2 cores)
Writes bench/results/stories_methods.json (rows as in shared bench conventions).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
logging_quiet = True

from layerquant.config import RunConfig  # noqa: E402

REFERENCE = dict(nsamples=128, seqlen=256, calib_selection="first", group_size=32, eval_windows=200, eval_seqlen=256)
CASES = [(method, bits) for bits in (8, 4, 3, 2) for method in ("rtn", "gptq")]


def main() -> int:
    from prefect.testing.utilities import prefect_test_harness

    from layerquant.flows.quantize import quantize_flow

    rows = []
    with tempfile.TemporaryDirectory() as store, prefect_test_harness(server_startup_timeout=90):
        for method, bits in CASES:
            report = quantize_flow(RunConfig(store=store, method=method, bits=bits, **REFERENCE).model_dump())
            rows.append({
                "bench": "stories_methods", "tool": "layerquant", "tool_version": "0.1.0", "model": "stories260K",
                "method": method, "bits": bits, "group_size": 32, "avg_bits": report["avg_bits"], "ppl": report["ppl_quant"],
                "ppl_fp": report["ppl_fp"], "eval_text": "tinystories_eval_600k", "eval_windows": 200, "eval_seqlen": 256,
                "wall_s": report["wall_s"], "peak_rss_mb": report["peak_rss_mb"], "workers": 1,
                "machine": report["machine"], "date": report["date"],
            })
            print(f"{method:5s} w{bits}: ppl {report['ppl_quant']:.3f} (fp {report['ppl_fp']:.3f}) avg_bits {report['avg_bits']:.3f}", file=sys.stderr)
    out = Path(__file__).parent / "results" / "stories_methods.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
