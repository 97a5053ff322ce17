"""stories260K: RTN vs GPTQ at 8/4/3/2 bits on the llm-compressor reference protocol, and what
refinement, norm tweaking, PB-LLM and adaptive granularity add below 4 bits.

Run: .venv/bin/python bench/stories_methods.py [--force] [--labels rtn,gptq]   (about 8 minutes on 2
quiet cores; cases already in the JSON are skipped unless --force; --labels runs only the cases
with these labels)
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
TUNING = {"normtweak": dict(norm_tweak_steps=100), "refine": dict(refine_steps=100),
          "refine+normtweak": dict(refine_steps=100, norm_tweak_steps=100)}
CASES: list[tuple[str, dict]] = [(method, dict(method=method, bits=bits)) for bits in (8, 4, 3, 2) for method in ("rtn", "gptq")]
CASES += [(f"gptq+{name}", dict(bits=bits, **tuning)) for bits in (4, 3, 2) for name, tuning in TUNING.items()]
# PB-LLM with honest storage (sign + salient mask bits, 8-bit salient values, fp16 scales)
CASES += [(f"pbllm-s{fraction}", dict(method="pbllm", bits=2, group_size=0, salient_fraction=fraction)) for fraction in (0.05, 0.1, 0.2)]
CASES += [("gptq", dict(bits=2, group_size=0))]  # per-channel 2-bit: the PB-LLM paper's GPTQ rival
CASES += [("gptq-granularity-auto", dict(bits=bits, granularity="auto")) for bits in (4, 3)]


def main() -> int:
    from prefect.testing.utilities import prefect_test_harness

    from layerquant.flows.quantize import quantize_flow

    out = Path(__file__).parent / "results" / "stories_methods.json"
    rows = json.loads(out.read_text()) if out.is_file() and "--force" not in sys.argv else []
    done = {(r["method"], r["bits"], r["group_size"], r.get("salient_fraction")) for r in rows}
    labels = sys.argv[sys.argv.index("--labels") + 1].split(",") if "--labels" in sys.argv else None
    with tempfile.TemporaryDirectory() as store, prefect_test_harness(server_startup_timeout=90):
        for label, settings in CASES:
            if labels is not None and label not in labels:
                continue
            config = RunConfig(store=store, **{**REFERENCE, **settings})
            group = "auto" if config.granularity == "auto" else config.group_size
            fraction = config.salient_fraction if config.method == "pbllm" else None
            if (label, config.bits if config.method != "pbllm" else None, group, fraction) in done:
                continue  # measured by an earlier run: delete the JSON or pass --force to redo
            report = quantize_flow(config.model_dump())
            rows.append({
                "bench": "stories_methods", "tool": "layerquant", "tool_version": "0.1.0", "model": "stories260K",
                "method": label, "bits": config.bits if config.method != "pbllm" else None, "group_size": group,
                "salient_fraction": fraction,
                "avg_bits": report["avg_bits"], "ppl": report["ppl_quant"], "nll_std_err": report["nll_std_err"],
                "ppl_fp": report["ppl_fp"], "eval_text": "tinystories_eval_600k", "eval_windows": 200, "eval_seqlen": 256,
                "wall_s": report["wall_s"], "peak_rss_mb": report["peak_rss_mb"], "workers": 1,
                "machine": report["machine"], "date": report["date"],
            })
            out.write_text(json.dumps(rows, indent=2))  # after every case: an interruption loses nothing finished
            print(f"{label:22s} w{config.bits} g{group}: ppl {report['ppl_quant']:.3f} (fp {report['ppl_fp']:.3f}) "
                  f"avg_bits {report['avg_bits']:.3f}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
