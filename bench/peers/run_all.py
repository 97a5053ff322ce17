"""Side by side with llm-compressor, GPTQModel and AutoRound (issues #7, #17): the same models, calibration
tokens and evaluation windows, each tool's defaults (GPTQ, RTN, AWQ, AutoRound), one evaluator (layerquant's)
for all, on this machine.

Run (from the repository root, one command):
    .venv/bin/python bench/peers/run_all.py [--models stories260K,gemma-3-270m] [--tools layerquant,llm-compressor,gptqmodel,auto-round]
                                            [--force] [--only SUBSTR] [--cases A,B] [--settle-load L] [--case-timeout S] [--results NAME] [--render]
Measured duration: see bench/README.md's "Side by side" section (the three peer venvs: ~3 min; stories260K
~35 min; Gemma 3 270M several hours, most of it AutoRound's six cases; --case-timeout bounds a peer's case).
Writes bench/results/peers.json (one row per case, kept after every case: a re-run skips the
rows it finds unless --force), peers.md (table) and peers.png (perplexity vs average bits).

How each tool is measured
- layerquant: `layerquant quantize` in its own process; wall_s and peak_rss_mb are those of the
  quantization (imports, Prefect's temporary server, calibration, scoring, blocks, export) with
  the evaluation that the CLI runs before exiting cut out by its log lines (eval_wall_s,
  total_wall_s and peak_rss_total_mb give the rest). One store for all cases, so the float
  perplexity is computed once and the calibration capture is reused (the row's `reused` lists
  what was found cached); a model's budget cases share a store of their own, emptied before the
  first of them, so the first budget's sensitivity scoring is timed in full and the second's
  reuse of those scores is marked.
- llm-compressor 0.14.0.1, in its own venv (~/.cache/layerquant/venvs/peers, torch 2.13.0 CPU,
  transformers 5.17.0, the newest it accepts): bench/peers/llmcompressor_case.py is fed the very
  calibration windows layerquant uses, and writes its fake-quantized weights as a plain float
  checkpoint, which `layerquant eval` then measures on the same windows. wall_s / peak_rss_mb
  are its whole process (load, oneshot, save). Its `float` row only goes through that load/save
  path and must match layerquant's float perplexity.
- Every peer row is measured by `layerquant eval --baseline FLOAT` in the shared store: the float
  model's pass (its last hidden states and per-window NLLs) is stored there once, by the first
  comparison or by one of our quantize runs on the same windows, and every later comparison runs
  only the peer's model through its blocks (the row's `baseline_pass`: blocks_run 0).
- GPTQModel 7.6.0, in its own venv (~/.cache/layerquant/venvs/gptqmodel, torch 2.13.0 CPU: 7.6.0 is
  the newest GPTQModel that accepts it; transformers 5.23.0, what it resolved to): GPTQ only (its
  GPTQConfig defaults with the row's bits / group, sym=True; act_group_aware (GAR) is on by default),
  fed the same calibration windows, loaded in float32 (it defaults to bf16 on CPU).
  bench/peers/gptqmodel_case.py dequantizes its packed checkpoint (qweight/qzeros/scales/g_idx) to
  a plain float checkpoint, measured by `layerquant eval` like the others; wall_s / peak_rss_mb are
  its whole process (load, quantize, pack, save, unpack). It accepts stories260K's ragged last group
  (down_proj: 172 columns, group 32), so its rows need no per-layer override; its 3-bit packer
  crashes on layers whose width is not a multiple of 32, which the case script works around
  (padding the lossless packing step only; see its docstring and tool_info.patched_packing).
- Sizes: avg_bits counts the codes plus one fp16 scale per group (symmetric, no zeros) for all
  tools. GPTQModel's real file also stores packed zeros (qzeros) and g_idx, but with sym=True every
  zero is 2^(bits-1) (checked), so they carry no information and are not counted.
- llm-compressor and GPTQModel have no bit allocator: next to layerquant's `--budget 3.25 / 2.5`
  (ip-*) rows the best uniform configuration whose size fits the budget is run through every tool
  (uniform-3.25 / uniform-2.5), so the IP plan is compared with uniform GPTQ of the same size from each.
- Other work on the machine: every case's row has other_cpu_cores (from 2026-12-05), the mean number of
  cores that work outside the case kept busy while it ran (the machine's busy CPU time from /proc/stat
  minus the case's process tree and this runner). The table marks a time measured beside more than
  SHARED_CORES of it (§): such a time is not an idle one; quality figures do not depend on it.
- --tools runs a subset of the tools; rows of the others are kept. Each row is merged into
  peers.json as its case ends (the file is re-read first), so two runs of this script on
  different cases do not overwrite each other's rows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(HERE))
from common import RESULTS, conditions, empty_store, load_rows, machine, run_measured, settle  # noqa: E402
from measure import layerquant_phases  # noqa: E402

CACHE = Path.home() / ".cache" / "layerquant"
PEERS_VENV = CACHE / "venvs" / "peers"
# what llmcompressor 0.14.0.1 resolves to here: it caps transformers at 5.17.0 and needs
# compressed-tensors 0.19.0; torch 2.13.0 is the CPU wheel in /opt/wheels (newer pulls CUDA)
PEER_PINS = {"llmcompressor": "0.14.0.1", "torch": "2.13.0", "transformers": "5.17.0", "compressed-tensors": "0.19.0",
             "matplotlib": "3.11.2"}
AUTOROUND_VENV = CACHE / "venvs" / "autoround"
# auto-round 0.16.1 (the newest) with the CPU torch wheel; the rest is what it resolved to here
AUTOROUND_PINS = {"auto-round": "0.16.1", "torch": "2.13.0", "transformers": "5.24.0", "accelerate": "1.16.0"}
GPTQMODEL_VENV = CACHE / "venvs" / "gptqmodel"
# gptqmodel 7.7.0 needs torch>=2.14.1, so 7.6.0 is the newest on the CPU wheel; the rest is what it
# resolved to (its requirements are lower bounds only; torchao is tied to the torch version and
# Defuser rewrites model definitions at load, so both are pinned too; it pins numpy itself)
GPTQMODEL_PINS = {"gptqmodel": "7.6.0", "torch": "2.13.0", "transformers": "5.23.0", "torchao": "0.18.0", "defuser": "0.0.28"}
# each peer: its own venv (their torch/transformers pins conflict), the script that runs one case
# in it, the json that script writes next to the plain float checkpoint, and its scratch folder
TOOLS = {
    "llm-compressor": dict(venv=PEERS_VENV, pins=PEER_PINS, script="llmcompressor_case.py", info="llmcompressor.json", slug="llmcompressor",
                           scratch=None),
    # scratch: the folder next to OUT that the script removes itself, unless the tool kills the process first
    "gptqmodel": dict(venv=GPTQMODEL_VENV, pins=GPTQMODEL_PINS, script="gptqmodel_case.py", info="gptqmodel.json", slug="gptqmodel",
                      scratch=".gptqmodel-tmp"),
    "auto-round": dict(venv=AUTOROUND_VENV, pins=AUTOROUND_PINS, script="autoround_case.py", info="autoround.json", slug="autoround",
                       scratch=None,
                       # its tqdm bar, "Quantizing model.layers.3:  17%|...| 3/18 [...]": blocks finished of all
                       progress=r"Quantizing \S+:\s+\d+%\|[^|]*\| (\d+)/(\d+) "),
}
# the results file rendered into peers.md, peers.png and the README table (bench/results/peers.json)
TABLE_RESULTS = "peers"
# a case's time is marked as not idle when other work kept more cores busy than this on average
SHARED_CORES = 0.25
# the peer kinds that are fed layerquant's calibration windows
CALIBRATED = ("gptq", "awq", "autoround")
ALL_TOOLS = ["layerquant", *TOOLS]
ASSETS = ROOT / "layerquant" / "assets"
DATA = BENCH / "data"  # WikiText-2 copies (CC BY-SA 3.0), see bench/data/README.md
LAYERQUANT = [sys.executable, "-m", "layerquant.cli"]
README_BEGIN, README_END = "<!-- peers table: written by bench/peers/run_all.py -->", "<!-- end of peers table -->"


def gemma_folder() -> str:
    result = subprocess.run([sys.executable, str(BENCH / "prepare_gemma.py")], check=True, stdout=subprocess.PIPE, text=True)
    return result.stdout.strip().splitlines()[-1]


def synthetic_folder() -> str:
    """bench/memory_streaming.py's 24-block hidden-2048 float32 Llama (random weights, 4.9 GB,
    the bundled tokenizer), built once into the cache: a model whose blocks are as wide as a 1B
    model's, for timing and memory (its perplexity is that of random weights, meaningless)."""
    folder = CACHE / "models" / "synthetic-24x2048"
    if not (folder / "config.json").exists():
        from memory_streaming import synthesize

        synthesize(folder, hidden=2048, intermediate=5632, blocks=24)
    return str(folder)


MODELS = {
    "stories260K": dict(path=lambda: str(ASSETS / "models" / "stories260K"),
                        calib=ASSETS / "text" / "tinystories_calib_190k.txt", eval=ASSETS / "text" / "tinystories_eval_600k.txt",
                        nsamples=128, seqlen=256, eval_windows=200, eval_seqlen=256, group=32),
    "gemma-3-270m": dict(path=gemma_folder, calib=DATA / "wikitext2_valid_tokens.txt", eval=DATA / "wikitext2_test_gptq_join.txt",
                         nsamples=32, seqlen=512, eval_windows=6, eval_seqlen=2048, group=128),
    # memory_streaming.py's calibration (16 x 256 tokens); two short windows: timing, not quality
    "synthetic-24x2048": dict(path=synthetic_folder, calib=ASSETS / "text" / "tinystories_calib_190k.txt",
                              eval=ASSETS / "text" / "tinystories_eval_600k.txt", nsamples=16, seqlen=256, eval_windows=2, eval_seqlen=256,
                              group=128),
}


def ours(method: str, **row) -> dict:
    return {"tool": "layerquant", "method": method, **row}


def peer(method: str, kind: str, bits: int | None = None, group: int | None = None, special: dict | None = None,
         tool: str = "llm-compressor", **row) -> dict:
    return {"tool": tool, "method": method, "kind": kind, "bits": bits, "group_size": group, "special": special or {}, **row}


def gptqm(method: str, bits: int, group: int, **row) -> dict:
    """A GPTQModel case (GPTQ only; it takes any group size, so no per-layer overrides)."""
    return peer(method, "gptq", bits, group, tool="gptqmodel", **row)


def awq(bits: int, group: int, special: dict | None = None) -> dict:
    """An llm-compressor AWQ case (AWQModifier + QuantizationModifier, asymmetric as AWQ is used)."""
    return peer(f"awq-w{bits}", "awq", bits, group, special, asym=True)


def autoround(bits: int, group: int) -> dict:
    """An AutoRound case: its defaults (200 sign-gradient iterations per block) on CPU."""
    return peer(f"autoround-w{bits}-g{group}", "autoround", bits, group, tool="auto-round")


# AutoRound: w4/w3/w2 at group 128 and 32 on both models
AUTOROUND_CASES = [autoround(bits, group) for bits in (4, 3, 2) for group in (128, 32)]


# stories260K: down_proj has 172 input columns. layerquant and GPTQModel allow a ragged last group
# (group 32: 6 groups, the last of 12 columns); llm-compressor needs a divisor, so its group-32 rows
# use 43 there (4 groups) and its group-64 row 86 (2 groups); avg_bits counts each tool's real groups.
CASES = {
    "stories260K": [
        peer("float", "float"),
        ours("gptq-w4", bits=4, group_size=32, flags=["--bits", "4"]),
        peer("gptq-w4", "gptq", 4, 32, {"down_proj": 43}),
        gptqm("gptq-w4", 4, 32),
        ours("gptq-w3", bits=3, group_size=32, flags=["--bits", "3"]),
        peer("gptq-w3", "gptq", 3, 32, {"down_proj": 43}),
        gptqm("gptq-w3", 3, 32),
        ours("ip-3.25", budget=3.25, flags=["--budget", "3.25"]),
        peer("uniform-3.25 (gptq-w3-g64)", "gptq", 3, 64, {"down_proj": 86}, budget=3.25),
        gptqm("uniform-3.25 (gptq-w3-g64)", 3, 64, budget=3.25),
        ours("ip-2.5", budget=2.5, flags=["--budget", "2.5"]),
        peer("uniform-2.5 (gptq-w2-g32)", "gptq", 2, 32, {"down_proj": 43}, budget=2.5),
        gptqm("uniform-2.5 (gptq-w2-g32)", 2, 32, budget=2.5),
        ours("rtn-w4", bits=4, group_size=32, flags=["--method", "rtn", "--bits", "4"]),
        peer("rtn-w4", "rtn", 4, 32, {"down_proj": 43}),
        ours("rtn-w3", bits=3, group_size=32, flags=["--method", "rtn", "--bits", "3"]),
        peer("rtn-w3", "rtn", 3, 32, {"down_proj": 43}),
        ours("gptq-w3+refine+normtweak", bits=3, group_size=32, flags=["--bits", "3", "--refine-steps", "100", "--norm-tweak-steps", "100"]),
        ours("ip-2.5+refine+normtweak", budget=2.5, flags=["--budget", "2.5", "--refine-steps", "100", "--norm-tweak-steps", "100"]),
        ours("uniform-3.25 (gptq-w3-g64)", bits=3, group_size=64, flags=["--bits", "3", "--group-size", "64"]),
        ours("uniform-2.5 (gptq-w2-g32)", bits=2, group_size=32, flags=["--bits", "2", "--group-size", "32"]),
        awq(4, 32, {"down_proj": 43}),
        awq(3, 32, {"down_proj": 43}),
        *AUTOROUND_CASES,
    ],
    # the peers' cases first (minutes each), then ours (each one is a whole `quantize` run
    # with two evaluations of a 262k-vocabulary model: tens of minutes on 2 cores)
    # GPTQ w4 g128 only: the "fastest GPTQ on a model much larger than a block" case
    "synthetic-24x2048": [
        peer("gptq-w4", "gptq", 4, 128),
        ours("gptq-w4", bits=4, group_size=128, flags=["--bits", "4"]),
    ],
    "gemma-3-270m": [
        peer("float", "float"),
        peer("gptq-w4", "gptq", 4, 128),
        peer("gptq-w3", "gptq", 3, 128),
        peer("uniform-3.25 (gptq-w3-g64)", "gptq", 3, 64, budget=3.25),
        peer("uniform-2.5 (gptq-w2-g32)", "gptq", 2, 32, budget=2.5),
        peer("rtn-w4", "rtn", 4, 128),
        peer("rtn-w3", "rtn", 3, 128),
        gptqm("gptq-w4", 4, 128),
        gptqm("gptq-w3", 3, 128),
        awq(4, 128),
        awq(3, 128),
        *AUTOROUND_CASES,
        ours("gptq-w4", bits=4, group_size=128, flags=["--bits", "4"]),
        ours("gptq-w3", bits=3, group_size=128, flags=["--bits", "3"]),
        ours("ip-3.25", budget=3.25, flags=["--budget", "3.25", "--recipe", str(ROOT / "recipes" / "gemma-budget.yaml")]),
        ours("ip-2.5", budget=2.5, flags=["--budget", "2.5", "--recipe", str(ROOT / "recipes" / "gemma-budget.yaml")]),
        ours("rtn-w4", bits=4, group_size=128, flags=["--method", "rtn", "--bits", "4"]),
        ours("rtn-w3", bits=3, group_size=128, flags=["--method", "rtn", "--bits", "3"]),
        ours("uniform-3.25 (gptq-w3-g64)", bits=3, group_size=64, flags=["--bits", "3", "--group-size", "64"]),
        ours("uniform-2.5 (gptq-w2-g32)", bits=2, group_size=32, flags=["--bits", "2", "--group-size", "32"]),
        # our answer to AutoRound's 200 iterations per block: GPTQ, then 50 refinement + 50 norm-tweaking steps
        ours("gptq-w3+refine+normtweak", bits=3, group_size=128, flags=["--bits", "3", "--refine-steps", "50", "--norm-tweak-steps", "50"]),
        # GPTQ at AutoRound's other sizes (w4/w3 g32, w2 g128), for the paired comparison with it
        ours("gptq-w4-g32", bits=4, group_size=32, flags=["--bits", "4", "--group-size", "32"]),
        ours("gptq-w3-g32", bits=3, group_size=32, flags=["--bits", "3", "--group-size", "32"]),
        ours("gptq-w2-g128", bits=2, group_size=128, flags=["--bits", "2"]),
        # the same tuning at 2 bits g32, where AutoRound is far ahead of plain GPTQ
        ours("gptq-w2-g32+refine+normtweak", bits=2, group_size=32,
             flags=["--bits", "2", "--group-size", "32", "--refine-steps", "50", "--norm-tweak-steps", "50"]),
    ],
}


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_venv(venv: Path, pins: dict[str, str]) -> Path:
    """The venv's python, after creating the venv and installing `pins` there if any pin is off."""
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = "import importlib.metadata as m, sys; sys.exit(any(m.version(p).split('+')[0] != v for p, v in %r.items()))" % pins
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode != 0:
        log(f"installing {pins} into {venv} (a few minutes)")
        subprocess.run([str(python), "-m", "pip", "install", "-q", *[f"{p}=={v}" for p, v in pins.items()]], check=True)
    return python


def ensure_peers_venv() -> Path:
    """llm-compressor's venv (also the one plot.py runs in: it has matplotlib)."""
    return ensure_venv(PEERS_VENV, PEER_PINS)


_PYTHONS: dict[str, Path] = {}


def tool_python(tool: str) -> Path:
    """A peer tool's venv python, checked (and built if needed) once per run, when first used."""
    if tool not in _PYTHONS:
        _PYTHONS[tool] = ensure_venv(TOOLS[tool]["venv"], TOOLS[tool]["pins"])
    return _PYTHONS[tool]


def calibration_windows(spec: dict, model: str, path: Path) -> None:
    """The calibration windows layerquant uses (first N x L tokens, BOS-prefixed), for the peer."""
    from safetensors.torch import save_file

    from layerquant.infra.texts import load_tokenizer, read_text, tokenize
    from layerquant.solvers.windows import make_windows

    tokenizer = load_tokenizer(model)
    windows = make_windows(tokenize(tokenizer, read_text(str(spec["calib"]))), spec["nsamples"], spec["seqlen"], tokenizer.bos_token_id, "first")
    save_file({"tokens": windows.contiguous()}, path)


def our_eval(model_dir: str, spec: dict, store: str, baseline: str | None = None) -> tuple[dict, float, list[str]]:
    """`layerquant eval` of a folder; against `baseline` (the float model) it adds the KL divergence,
    top-1 agreement and the paired perplexity ratio."""
    command = [*LAYERQUANT, "eval", "--model", model_dir, "--text", str(spec["eval"]), "--windows", str(spec["eval_windows"]),
               "--seqlen", str(spec["eval_seqlen"]), "--store", store, *(["--baseline", baseline] if baseline else [])]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"layerquant eval of {model_dir} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), round(time.perf_counter() - started, 1), command


def divergence_fields(result: dict) -> dict:
    """From a `layerquant eval --baseline FLOAT` result: KL(float || model) mean and p99, top-1
    agreement, the perplexity ratio's paired 95% interval, and the per-window NLL sums (rows on
    the same windows are compared pairwise from them: see paired_against_best_peer)."""
    paired = result.get("paired")
    fields = {"kl_mean": result.get("kl_mean"), "kl_p99": result.get("kl_p99"), "top1_agreement": result.get("top1_agreement"),
              "ppl_ratio_ci95": [paired["low"], paired["high"]] if paired else None,
              "window_nll": result.get("window_nll"), "window_tokens": result.get("window_tokens")}
    if result.get("baseline_pass"):  # the float model's blocks run for this row (0: its stored pass was reused) and the seconds
        fields["baseline_pass"] = result["baseline_pass"]
    return fields


def report_divergence_fields(report: dict) -> dict:
    """The same fields from a quantize run's report.json (its first evaluation text)."""
    first = next(iter((report.get("evaluations") or {"": {}}).values()))
    return {"kl_mean": report.get("kl_mean"), "kl_p99": report.get("kl_p99"), "top1_agreement": report.get("top1_agreement"),
            "ppl_ratio_ci95": report.get("ppl_ratio_ci95"), "window_nll": first.get("window_nll_quant"),
            "window_tokens": first.get("window_tokens")}


def peer_avg_bits(info: dict) -> float:
    """Storage per quantized weight as layerquant counts it: codes + one fp16 scale per group
    (+ a zero point at code precision per group for an asymmetric grid)."""
    total = weights = 0
    per_group = 16 + (info["bits"] if info.get("asym") else 0)
    for name, (rows, cols) in info["shapes"].items():
        group = info["group_sizes"][name]
        total += rows * cols * info["bits"] + rows * math.ceil(cols / group) * per_group
        weights += rows * cols
    return total / weights


def model_facts(model: str) -> dict:
    from layerquant.infra.checkpoint import CheckpointReader

    files = list(Path(model).glob("*.safetensors"))
    return {"model_mb": round(sum(f.stat().st_size for f in files) / 2**20, 1), "n_blocks": CheckpointReader(model).n_blocks}


def run_ours(case: dict, name: str, spec: dict, model: str, args, env: dict) -> dict:
    out = Path(args.out_root) / f"{name}-layerquant-{case['method']}"
    store = args.store
    if case.get("budget") is not None:
        # budget runs store their sensitivity scores: the model's budget cases share a store that
        # is emptied before the first of them in this invocation, so the first is timed in full
        # and the later ones show the reuse (`reused`, * in the table) instead of hiding it
        store = str(Path(args.store).with_name(Path(args.store).name + "-budget") / name)
        if name not in args.budget_stores_emptied:
            empty_store(store)
            args.budget_stores_emptied.add(name)
    command = [*LAYERQUANT, "quantize", "--model", model, "--calib", str(spec["calib"]), "--eval", str(spec["eval"]),
               "--nsamples", str(spec["nsamples"]), "--seqlen", str(spec["seqlen"]), "--calib-selection", "first",
               "--eval-windows", str(spec["eval_windows"]), "--eval-seqlen", str(spec["eval_seqlen"]),
               "--group-size", str(spec["group"]), *case["flags"], "--store", store, "--out", str(out), "--overwrite"]
    log("  " + shlex.join(command))
    measured = run_measured(command, env=env, echo=(lambda line: print("    | " + line, file=sys.stderr, flush=True)) if args.verbose else None)
    # the run's log with seconds since its start: where a case's time went, after the fact
    out.with_name(out.name + ".log").write_text("".join(f"{t:8.2f} {text}\n" for t, text in measured["stderr_lines"]))
    if measured["returncode"] != 0:
        tail = "\n".join(text for _, text in measured["stderr_lines"][-30:])
        raise RuntimeError(f"exit {measured['returncode']}: {tail[-3000:]}")
    phases = layerquant_phases(measured)
    report = json.loads((out / "report.json").read_text())
    reused = [text.split(": ", 1)[-1] for _, text in measured["stderr_lines"] if "cached" in text and "perplexity" not in text]
    row = {"tool_version": tool_version_ours(), "bits": case.get("bits"), "group_size": case.get("group_size"), "budget": case.get("budget"),
           "avg_bits": report["avg_bits"], "ppl": report["ppl_quant"], "nll_std_err": report.get("nll_std_err"), "ppl_fp": report["ppl_fp"],
           "wall_s": phases["quant_wall_s"], "peak_rss_mb": phases["quant_peak_rss_mb"], "eval_wall_s": phases["eval_wall_s"],
           "total_wall_s": measured["wall_s"], "peak_rss_total_mb": measured["peak_rss_mb"], "report_wall_s": report["wall_s"],
           "other_cpu_cores": measured["other_cpu_cores"],
           "blocks_cached": report.get("blocks_cached", []), "reused": reused, "command": shlex.join(command),
           **report_divergence_fields(report)}
    if case.get("budget") is not None:
        row["bits_used"] = sorted({layer["bits"] for layer in report["layers"]})
        row["group_sizes_used"] = sorted({layer["group_size"] for layer in report["layers"]})
    if not args.keep_outputs:
        for weights in out.glob("*.safetensors"):
            weights.unlink()
    return row


class CaseTimedOut(RuntimeError):
    """A peer's case stopped at --case-timeout; `fields` go into its row (what it had done, the
    time it would have taken at that pace)."""

    def __init__(self, message: str, fields: dict):
        super().__init__(message)
        self.fields = fields


def timed_out(measured: dict, timeout_s: float, pattern: str | None, case_kind: str) -> CaseTimedOut:
    """Why a case was stopped, with its pace where the tool reports per-block progress: the first
    time each count of finished blocks appeared gives the seconds per block and so the whole case."""
    first_seen: dict[int, float] = {}
    total = None
    for at, text in measured["stderr_lines"]:
        match = re.search(pattern, text) if pattern else None
        if match:
            first_seen.setdefault(int(match.group(1)), at)
            total = int(match.group(2))
    fields = {"stopped_after_s": timeout_s}
    message = f"stopped after {timeout_s:.0f} s (--case-timeout)"
    if 0 in first_seen and len(first_seen) > 1:
        done = max(first_seen)
        block_s = (first_seen[done] - first_seen[0]) / done
        estimate = first_seen[0] + block_s * total
        fields |= {"blocks_done": done, "blocks_total": total, "block_s": round(block_s, 1), "estimated_case_s": round(estimate)}
        message += (f" with {done} of {total} blocks done at {block_s:.0f} s per block: the {case_kind} case would take "
                    f"about {estimate / 3600:.1f} h on this machine")
    return CaseTimedOut(message, fields)


def run_peer(case: dict, name: str, spec: dict, model: str, args) -> dict:
    """One case of a peer tool (TOOLS[case["tool"]]): its case script in its venv writes a plain
    float checkpoint and a json (version, per-layer group sizes and shapes), then `layerquant eval`."""
    tool = TOOLS[case["tool"]]
    python = tool_python(case["tool"])
    out = Path(args.out_root) / f"{name}-{tool['slug']}-{case['method'].split()[0]}"
    shutil.rmtree(out, ignore_errors=True)
    windows = Path(args.out_root) / f"{name}-calib-windows.safetensors"
    if case["kind"] in CALIBRATED and not windows.is_file():
        calibration_windows(spec, model, windows)
    command = [str(python), str(HERE / tool["script"]), "--model", model, "--out", str(out), "--method", case["kind"]]
    if case["kind"] != "float":
        command += ["--bits", str(case["bits"]), "--group", str(case["group_size"])]
        command += ["--special", *[f"{k}={v}" for k, v in case["special"].items()]] if case["special"] else []
        command += ["--asym"] if case.get("asym") else []
    if case["kind"] in CALIBRATED:
        command += ["--windows", str(windows)]
    log("  " + shlex.join(command))
    try:
        measured = run_measured(command, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                                timeout_s=args.case_timeout)
    finally:
        if tool["scratch"]:  # GPTQModel os._exit()s when a worker thread fails, so its script cannot always clean up
            shutil.rmtree(out.with_name(f".{out.name}{tool['scratch']}"), ignore_errors=True)
    if measured["timed_out"]:
        shutil.rmtree(out, ignore_errors=True)  # whatever the killed case had begun to write
        raise timed_out(measured, args.case_timeout, tool.get("progress"), case["kind"])
    if measured["returncode"] != 0:
        raise RuntimeError(f"exit {measured['returncode']}: {measured['stderr'][-3000:]}")
    info = json.loads((out / tool["info"]).read_text())
    result, eval_s, eval_command = our_eval(str(out), spec, args.store, baseline=None if case["kind"] == "float" else model)
    row = {"tool_version": info["version"], "bits": case["bits"], "group_size": case["group_size"], "budget": case.get("budget"),
           "group_size_overrides": case["special"] or None,
           "avg_bits": 32.0 if case["kind"] == "float" else peer_avg_bits(info), "ppl": result["ppl"], "nll_std_err": result.get("nll_std_err"),
           "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"], "eval_wall_s": eval_s,
           "other_cpu_cores": measured["other_cpu_cores"], "command": shlex.join(command), "eval_command": shlex.join(eval_command), "asym": bool(info.get("asym")),
           **divergence_fields(result)}
    # what the tool reports about itself beyond the common keys (GPTQModel: its resolved quantize
    # config, packed file size, patched packing); the per-layer tables stay in its json
    extra = {k: v for k, v in info.items() if k not in ("version", "method", "bits", "group_sizes", "shapes", "seconds", "asym")}
    if extra:
        row["tool_info"] = extra
    if not args.keep_outputs:
        for weights in out.glob("*.safetensors"):
            weights.unlink()
    return row


def save_row(row: dict, results: str) -> list[dict]:
    """Put `row` into bench/results/<results>.json in place of the row with the same (model, tool,
    method) and return all rows. The file is re-read first and replaced atomically, so rows that
    another run of this script (other tools or cases) wrote in the meantime are kept."""
    key = (row["model"], row["tool"], row["method"])
    for attempt in range(5):
        try:
            rows = load_rows(results)
            break
        except json.JSONDecodeError:  # caught another writer mid-write
            time.sleep(0.2 * (attempt + 1))
    else:
        raise RuntimeError(f"{RESULTS / (results + '.json')} is not valid JSON")
    rows = [r for r in rows if (r["model"], r["tool"], r["method"]) != key] + [row]
    temporary = RESULTS / f".{results}.json.{os.getpid()}"
    temporary.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(temporary, RESULTS / f"{results}.json")
    return rows


_VERSION = None


def tool_version_ours() -> str:
    global _VERSION
    if _VERSION is None:
        from importlib.metadata import version

        _VERSION = version("layerquant")
    return _VERSION


def current(row: dict, spec: dict) -> bool:
    """Whether a finished row stands: measured on the chosen windows, with per-window NLLs."""
    return row.get("ppl") is not None and row.get("eval_windows") == spec["eval_windows"] and bool(row.get("window_nll"))


def tool_versions(tool: str) -> str:
    """A peer's version as pinned (for a row whose case failed before the tool reported it)."""
    pins = TOOLS[tool]["pins"]
    return next(iter(pins.values()))


def failure_reason(message: str) -> str:
    """The line of a failed case's output that says why: the last exception line, else the last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line or "Exception" in line]
    return (errors or lines or ["unknown failure"])[-1][:300]


def same_size(ours: dict, other: dict) -> bool:
    """Whether a peer row is at our row's size: for our bit plans the same budget, or a peer's
    uniform configuration of the plan's average bits (AutoRound's w2 g32 next to a 2.5-bit plan);
    else the same bits and group size (a peer's uniform-B row included)."""
    if ours.get("budget") is not None:
        uniform_of_same_size = (other.get("budget") is None and other.get("avg_bits") is not None
                                and abs(other["avg_bits"] - ours["avg_bits"]) < 0.005)
        return other.get("budget") == ours["budget"] or uniform_of_same_size
    return (other.get("bits"), other.get("group_size")) == (ours.get("bits"), ours.get("group_size"))


def paired_against_best_peer(row: dict, rows: list[dict]) -> str:
    """Our row against the best peer row (lowest perplexity) at the same size, measured on the
    same windows: perplexity ratio ours / peer with its paired 95% interval."""
    from layerquant.solvers.evaluation import paired_ratio

    if row["tool"] != "layerquant" or row["method"] == "float" or not row.get("window_nll"):
        return ""
    peers = [r for r in rows if r["model"] == row["model"] and r["tool"] != "layerquant" and r.get("ppl") is not None
             and r.get("window_nll") and len(r["window_nll"]) == len(row["window_nll"]) and same_size(row, r)]
    if not peers:
        return ""
    best = min(peers, key=lambda r: r["ppl"])
    paired = paired_ratio(best["window_nll"], row["window_nll"], row["window_tokens"])
    verdict = "better" if paired["high"] < 1 else "worse" if paired["low"] > 1 else "tie"
    return f"{paired['ratio']:.3f} [{paired['low']:.3f}, {paired['high']:.3f}] {verdict} vs {best['tool']} {best['method'].split()[0]}"


def row_spec(row: dict) -> str:
    if row["method"] == "float":
        return "float32"
    if row.get("budget") is not None and row["tool"] == "layerquant":
        return f"budget {row['budget']}: bits {row.get('bits_used')} g {row.get('group_sizes_used')}"
    extra = ", " + ", ".join(f"{k} {v}" for k, v in row["group_size_overrides"].items()) if row.get("group_size_overrides") else ""
    spec = f"{row['bits']} / {row['group_size']}{extra}" + (" asym" if row.get("asym") else "")
    if (row.get("tool_info") or {}).get("patched_packing"):
        spec += " †"
    if (row.get("tool_info") or {}).get("patched_pin_memory"):
        spec += " ‡"
    return spec


def render(rows: list[dict], python: Path) -> None:
    header = ("| model | tool | method | bits / group | avg bits | perplexity | vs float [95% CI] | KL mean | KL p99 | top-1 | "
              "vs best peer [95% CI] | quant. wall s | quant. peak RSS MB |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for row in sorted(rows, key=lambda r: (r["model"] != "stories260K", r["model"], -(r["avg_bits"] or 0), r["tool"], r["method"])):
        spec = row_spec(row)
        if row.get("ppl") is None:
            lines.append(f"| {row['model']} | {row['tool']} {row['tool_version']} | {row['method']} | {spec} | | "
                         f"failed: {row.get('failed', '').replace('|', '/')} | | | | | | | |")
            continue
        wall = f"{row['wall_s']:.0f}" if row.get("wall_s") is not None else ""
        if any("calibration" not in item for item in row.get("reused") or []):
            wall += "*"
        if row.get("shared_cores") or (row.get("other_cpu_cores") or 0) > SHARED_CORES:
            wall += " §"
        rss = f"{row['peak_rss_mb']:.0f}" if row.get("peak_rss_mb") else ""
        ratio = f"{row['ppl'] / row['ppl_fp']:.3f}x" if row.get("ppl_fp") else ""
        if row.get("ppl_ratio_ci95"):
            ratio += f" [{row['ppl_ratio_ci95'][0]:.3f}, {row['ppl_ratio_ci95'][1]:.3f}]"
        kl = f"{row['kl_mean']:.4f}" if row.get("kl_mean") is not None else ""
        kl99 = f"{row['kl_p99']:.3f}" if row.get("kl_p99") is not None else ""
        top1 = f"{100 * row['top1_agreement']:.1f}%" if row.get("top1_agreement") is not None else ""
        lines.append(f"| {row['model']} | {row['tool']} {row['tool_version']} | {row['method']} | {spec} | {row['avg_bits']:.3f} | "
                     f"{row['ppl']:.3f} | {ratio} | {kl} | {kl99} | {top1} | {paired_against_best_peer(row, rows)} | {wall} | {rss} |")
    notes = ["", "Perplexity: layerquant's evaluator for every tool (non-overlapping BOS-prefixed windows; stories260K: first 200 x 256 "
             "tokens of tinystories_eval_600k; Gemma 3 270M: first 6 x 2048 tokens of wikitext2_test_gptq_join). "
             "vs float: perplexity ratio to the float model with its paired 95% interval over the windows (t interval of the "
             "per-window NLL differences, token-weighted; blank on rows measured before per-window NLLs were kept). KL mean / p99: "
             "KL(float || quantized) of the next-token distributions in nats, mean over the evaluation tokens and its 99th "
             "percentile; top-1: share of tokens whose most likely next token is the float model's. vs best peer: our perplexity "
             "over that of the best peer row (lowest perplexity) of the same size (same bits and group, or the same budget), "
             "paired 95% interval over the same windows: better / worse when it excludes 1, tie otherwise. "
             "avg bits: codes + fp16 scale per group, for every tool (+ a zero point at code precision per group for the "
             "asymmetric AWQ rows; GPTQModel's file also stores packed zeros, but symmetric "
             "zeros are all 2^(bits-1), so they are not counted). Quantization wall time and peak RSS of the whole process tree, evaluation "
             "excluded (the float rows: llm-compressor's load + save only; GPTQModel's rows include its packing and our unpacking). "
             "* = blocks or scores found cached in the store (see `reused` in peers.json). "
             f"§ = other work kept more than {SHARED_CORES} of a core busy on average during the case (the row's "
             "`other_cpu_cores`, measured from 2026-12-05; before that, `shared_cores` says which job): not an idle time. llm-compressor's and GPTQModel's "
             "uniform-B rows are their best uniform configuration that fits layerquant's budget B (they have no bit allocator). "
             "† GPTQModel 7.6.0's 3-bit packer crashes on layers whose width is not a multiple of 32 (stories260K's 172); "
             "bench/peers/gptqmodel_case.py pads that lossless packing step, the quantization is GPTQModel's own. "
             "‡ llm-compressor 0.14.0.1's AWQ pins cached activations in memory, which a CPU-only torch refuses; "
             "bench/peers/llmcompressor_case.py makes that transfer optimization a no-op on a machine without CUDA (no value changes). "
             "failed: the peer could not run the case on this machine (its error), or it was stopped at run_all.py's "
             "--case-timeout (the row then gives the pace it had reached and the time the whole case would take). "
             "Gemma 3 270M's weights come from a Q4_K_M GGUF (already on llama.cpp grids).",
             f"Machine: {rows[0]['machine'] if rows else ''}; generated by bench/peers/run_all.py."]
    table = "\n".join(lines + notes) + "\n"
    (RESULTS / "peers.md").write_text(table)
    subprocess.run([str(python), str(HERE / "plot.py"), str(RESULTS / "peers.json"), str(RESULTS / "peers.png")], check=True)
    write_into_readme(table)


def write_into_readme(table: str) -> None:
    """Replace the generated block of bench/README.md (between the two markers) with the new
    table, so the benchmarks page never shows numbers the JSON does not hold."""
    readme = BENCH / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        log(f"{readme} has no {README_BEGIN} ... {README_END} block: table left in {RESULTS / 'peers.md'} only")
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    dates = sorted(r["date"][:10] for r in load_rows(TABLE_RESULTS))
    stamp = f"Measured {dates[0]} to {dates[-1]}." if dates else ""
    readme.write_text(f"{head}{README_BEGIN}\n{table}{stamp}\n\n![perplexity against average bits](results/peers.png)\n{README_END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--tools", default=",".join(ALL_TOOLS), help="comma-separated subset of " + ", ".join(ALL_TOOLS))
    parser.add_argument("--only", help="run only cases whose method contains this text")
    parser.add_argument("--cases", help="run only these methods (comma-separated, exact names, e.g. gptq-w4,rtn-w4)")
    parser.add_argument("--force", action="store_true", help="redo the chosen cases even if peers.json has them (empties --store)")
    parser.add_argument("--store", default=str(CACHE / "peers" / "store"), help="layerquant artifact store shared by the cases")
    parser.add_argument("--out-root", default=str(CACHE / "peers" / "out"))
    parser.add_argument("--keep-outputs", action="store_true", help="keep the quantized weights (deleted after measuring by default)")
    parser.add_argument("--verbose", action="store_true", help="echo layerquant's log")
    parser.add_argument("--eval-windows", type=int,
                        help="evaluation windows for every chosen model (default: the model's own, e.g. 6 x 2048 on Gemma); "
                             "rows are compared pairwise only with rows measured on as many windows")
    parser.add_argument("--settle-load", type=float, help="before each case, wait (up to 4 min) until the 1-minute load "
                                                          "average is below this (e.g. 1.0), so timings start on a quiet machine")
    parser.add_argument("--case-timeout", type=float,
                        help="stop a peer's case after this many seconds; its row then says so, with the pace it had reached "
                             "and the time the whole case would take where the tool reports per-block progress (AutoRound)")
    parser.add_argument("--results", default=TABLE_RESULTS,
                        help="rows go to bench/results/<RESULTS>.json; only the default (peers) is rendered into the README "
                             "table: another name keeps a side measurement (e.g. more windows) apart from it and prints "
                             "our rows' paired comparisons instead")
    parser.add_argument("--render", action="store_true", help="only regenerate peers.md, peers.png and the README table from peers.json")
    args = parser.parse_args()
    if args.render:
        render(load_rows(TABLE_RESULTS), ensure_peers_venv())
        return 0
    args.budget_stores_emptied = set()
    chosen = [m for m in args.models.split(",") if m]
    unknown = set(chosen) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}: choose from {list(MODELS)}")
    tools = [t for t in args.tools.split(",") if t]
    if set(tools) - set(ALL_TOOLS) or not tools:
        parser.error(f"unknown tool(s) {sorted(set(tools) - set(ALL_TOOLS))}: choose from {ALL_TOOLS}")
    if args.force:
        empty_store(args.store)  # cached blocks would fake the timings of redone cases
    Path(args.out_root).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    python = ensure_peers_venv()  # plot.py runs there
    rows = load_rows(args.results)
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    failures = []
    for name in chosen:
        spec = MODELS[name] | ({"eval_windows": args.eval_windows} if args.eval_windows else {})
        model = spec["path"]()
        facts = model_facts(model)
        common_row = {"bench": "peers", "model": name, **facts, "eval_text": Path(spec["eval"]).stem, "eval_windows": spec["eval_windows"],
                      "eval_seqlen": spec["eval_seqlen"], "calib_text": Path(spec["calib"]).stem,
                      "calib": f"first {spec['nsamples']} x {spec['seqlen']} tokens", "workers": 1}
        ppl_fp = None
        for case in CASES[name]:
            if case["tool"] not in tools or (args.only and args.only not in case["method"]):
                continue
            if args.cases and case["method"] not in args.cases.split(","):
                continue
            key = (name, case["tool"], case["method"])
            # a row measured on other windows, or before per-window NLLs were kept (no paired
            # comparison, no KL), is stale; a failed one is retried
            existing = [r for r in rows if (r["model"], r["tool"], r["method"]) == key and current(r, spec)]
            if existing and not args.force:
                continue
            if ppl_fp is None:
                floats = [r for r in rows if r["model"] == name and r["tool"] == "layerquant" and r["method"] == "float" and current(r, spec)]
                # --force redoes the float row only when it is among the chosen cases: a timing
                # re-run of a few quantized cases keeps the float model's (unchanged) perplexity
                redo_float = args.force and (args.cases is None or "float" in args.cases.split(","))
                if floats and not redo_float:
                    ppl_fp = floats[0]["ppl"]
                else:
                    log(f"{name}: float perplexity with layerquant's evaluator")
                    result, eval_s, command = our_eval(model, spec, args.store)
                    ppl_fp = result["ppl"]
                    rows = save_row({**common_row, "tool": "layerquant", "tool_version": tool_version_ours(), "method": "float", "bits": None,
                                     "group_size": None, "avg_bits": 32.0, "ppl": ppl_fp, "nll_std_err": result.get("nll_std_err"),
                                     "ppl_fp": ppl_fp, "wall_s": None, "peak_rss_mb": None, "eval_wall_s": eval_s, "command": shlex.join(command),
                                     "window_nll": result.get("window_nll"), "window_tokens": result.get("window_tokens"),
                                     "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, args.results)
                    log(f"{name}: float {ppl_fp:.4f} ({eval_s:.0f} s)")
            log(f"{name} {case['tool']} {case['method']}")
            settled_s = settle(args.settle_load)
            at_start = conditions() | ({"settle_wait_s": settled_s} if args.settle_load is not None else {})
            case_started = time.perf_counter()
            try:
                if case["tool"] == "layerquant":
                    measured = run_ours(case, name, spec, model, args, env)
                else:
                    measured = run_peer(case, name, spec, model, args)
            except Exception as exc:  # one failed case must not lose the others
                failures.append(f"{name} {case['tool']} {case['method']}: {exc}")
                log(f"  FAILED: {str(exc)[-1500:]}")
                if case["tool"] != "layerquant":  # the table says why a peer has no number for this case
                    rows = save_row({**common_row, "tool": case["tool"], "method": case["method"], "bits": case.get("bits"),
                                     "group_size": case.get("group_size"), "budget": case.get("budget"), "tool_version": tool_versions(case["tool"]),
                                     "avg_bits": None, "ppl": None, "ppl_fp": ppl_fp,
                                     "failed": str(exc) if isinstance(exc, CaseTimedOut) else failure_reason(str(exc)),
                                     **(exc.fields if isinstance(exc, CaseTimedOut) else {}),
                                     "case_wall_s": round(time.perf_counter() - case_started, 1), **at_start, "machine": machine(),
                                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, args.results)
                continue
            row = {**common_row, "tool": case["tool"], "method": case["method"], "ppl_fp": ppl_fp, **measured,
                   "case_wall_s": round(time.perf_counter() - case_started, 1), **at_start,
                   "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            if case["tool"] == "layerquant" and abs(measured["ppl_fp"] - ppl_fp) > 1e-6 * ppl_fp:
                row["note"] = f"report's ppl_fp {measured['ppl_fp']:.6f} differs from `layerquant eval` {ppl_fp:.6f}"
            row["ppl_fp"] = ppl_fp
            rows = save_row(row, args.results)  # after every case: an interruption loses nothing finished
            log(f"  ppl {row['ppl']:.4f} at {row['avg_bits']:.3f} bits, quantization {row['wall_s']:.0f} s, "
                f"peak {row['peak_rss_mb']:.0f} MB (case {row['case_wall_s']:.0f} s; other work {row.get('other_cpu_cores', 0):.2f} cores)")
    rows = load_rows(args.results)  # with whatever a concurrent run added
    if args.results == TABLE_RESULTS:
        if rows:
            render(rows, python)
    else:  # a side measurement: its comparisons go to the log, not to the table
        for row in rows:
            if paired := paired_against_best_peer(row, rows):
                log(f"{row['model']} {row['method']} on {row['eval_windows']} windows: ours / best peer {paired}")
    log(f"done in {time.perf_counter() - started:.0f} s; {len(failures)} failed case(s)")
    for failure in failures:
        log("  " + failure[:500])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
