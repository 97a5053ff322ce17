"""stories260K: does the float prompt cache help when the prompt is context the continuation reads? (issue 16)

The shared-prompt evaluation (solvers.windows.prompt_windows: BOS + the eval text's first 63 tokens
before every continuation, what the pipeline's validation and bench/stories_prompt_cache.py use)
puts one story's opening before continuations cut from other stories: for every window but the
first, the prompt is a distractor. This measures how much that matters, on the same 192-token
continuations after three contexts:
- "shared": the shared prompt (prompt_windows);
- "own": BOS + the 63 text tokens right before each continuation (the window's own context; for the
  first continuation the same tokens as the shared prompt);
- "none": BOS alone (windows of 193 tokens, scored from position 1).
First the float model in each context, then W4A4KV4 and W3A3KV3 (GPTQ g32, 32 random calibration
windows x 256; plain, and rotated with each of --seeds) with the whole cache quantized against the
first 64 positions' keys and values kept float: the float model's (BiSup's prompt-precision cache,
what the pipeline's validation uses; in the own context each window's own, as
RuntimeModel.perplexity computes it for windows that do not share a prompt) and the quantized
model's own prompt states. The kept-float run calibrates with its windows' first 64 positions
unquantized, once per setting for both contexts. "paired": kept-float perplexity over
all-quantized, with the 95% interval from the per-window differences, against the all-quantized
run ("weights": "each its own") and against the kept-float run's weights with the whole cache
quantized ("the kept-float run's": only the cache differs, not GPTQ's calibration; what
tests/test_runtime_quant.py's prompt-cache tests measure, in the own context).

Run: .venv/bin/python bench/stories_prompt_context.py   (about 2 minutes on one thread)
Writes bench/results/stories_prompt_context.json (all rows replaced).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import commit, conditions, machine, write_rows  # noqa: E402
from support.runtime_model import continuation_windows, open_model, own_context_windows, plan, quantize_run, text_windows  # noqa: E402,E501

from layerquant.config import default_calib, default_eval, default_model  # noqa: E402
from layerquant.runtime_quant import RuntimeQuant  # noqa: E402
from layerquant.solvers.evaluation import paired_ratio  # noqa: E402
from layerquant.specs import QuantSpec  # noqa: E402

PROMPT, CONTINUATION, CALIB_WINDOWS = 64, 192, 32


def three_contexts(tokenizer, count: int) -> dict[str, tuple[torch.Tensor, int]]:
    """context -> (windows, first scored position): the same `count` continuations after the shared
    prompt, after their own preceding text, after BOS alone."""
    shared = continuation_windows(tokenizer, default_eval(), count, PROMPT, CONTINUATION)
    own = own_context_windows(tokenizer, default_eval(), count, PROMPT, CONTINUATION)
    bos_column = shared[:, :1]
    return {"shared": (shared, PROMPT), "own": (own, PROMPT), "none": (torch.cat([bos_column, shared[:, PROMPT:]], dim=1), 1)}


def evaluate(reader, model, blocks, windows, score_from: int, float_prompt: bool = False) -> dict:
    """Continuation perplexity; with settings.prompt_kv_tokens the first positions' cache is kept
    float: the float model's states of the prompt(s) when `float_prompt`, else the quantized
    model's own."""
    float_weights = (lambda i: model.block_weights(reader.block_weights(i))) if float_prompt else None
    return model.perplexity(windows, reader.n_blocks, lambda i: blocks[i], reader.embed_weight(), reader.final_norm_weight(),
                            reader.lm_head_weight(), score_from=score_from, float_block_weights=float_weights)


def base_row(**fields) -> dict:
    return {"bench": "stories_prompt_context", "model": "stories260K", "tool": "layerquant", **fields}


def stamp(row: dict) -> dict:
    return row | {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "machine": machine(), **conditions()}


def measure_float(reader, contexts) -> list[dict]:
    model = plan(reader, RuntimeQuant())
    blocks = quantize_run(reader, model, None, None)
    results = {name: evaluate(reader, model, blocks, windows, start) for name, (windows, start) in contexts.items()}
    rows = []
    for name, result in results.items():
        paired = paired_ratio(results["none"]["window_nll"], result["window_nll"], result["window_tokens"])
        rows.append(stamp(base_row(setting="float", context=name, eval_windows=int(contexts[name][0].shape[0]), cont_ppl=result["ppl"],
                                   over_no_context={key: paired[key] for key in ("ratio", "low", "high")})))
        print(f"float, context {name}: {result['ppl']:.4f} ({paired['ratio']:.4f} [{paired['low']:.4f}, {paired['high']:.4f}] "
              "of no context)", flush=True)
    return rows


def measure_quantized(reader, calib, contexts, bits: int, rotate: bool, seed: int = 0) -> list[dict]:
    start = time.perf_counter()
    spec = QuantSpec(bits=bits, group_size=32)
    full_model = plan(reader, RuntimeQuant(act_bits=bits, kv_bits=bits, rotate=rotate, seed=seed))
    full_blocks = quantize_run(reader, full_model, calib, spec)
    kept_model = plan(reader, RuntimeQuant(act_bits=bits, kv_bits=bits, rotate=rotate, seed=seed, prompt_kv_tokens=PROMPT))
    kept_blocks = quantize_run(reader, kept_model, calib, spec)
    rows = []
    for context in ("shared", "own"):
        windows, score_from = contexts[context]
        # the all-quantized reference: its own run, or the kept-float run's weights with the whole cache quantized
        references = {"each its own": evaluate(reader, full_model, full_blocks, windows, score_from),
                      "the kept-float run's": evaluate(reader, full_model, kept_blocks, windows, score_from)}
        caches = {"float-model": evaluate(reader, kept_model, kept_blocks, windows, score_from, float_prompt=True),
                  "own-states": evaluate(reader, kept_model, kept_blocks, windows, score_from)}
        for calibration, full in references.items():
            for cache, result in caches.items():
                paired = paired_ratio(full["window_nll"], result["window_nll"], full["window_tokens"])
                rows.append(stamp(base_row(
                    setting=f"W{bits}A{bits}KV{bits}", method="gptq", bits=bits, group_size=32, act_bits=bits, kv_bits=bits,
                    rotate=rotate, rotate_seed=seed if rotate else None, context=context, prompt_kv_tokens=PROMPT,
                    prompt_cache=cache, weights=calibration, nsamples=CALIB_WINDOWS, eval_windows=int(windows.shape[0]),
                    cont_ppl_all_quantized=full["ppl"], cont_ppl_prompt_cache=result["ppl"],
                    paired={key: paired[key] for key in ("ratio", "low", "high")})))
                name = f"W{bits}A{bits}KV{bits} {f'rotated (seed {seed})' if rotate else 'plain'}"
                print(f"{name}, context {context}, weights {calibration}, {cache}: "
                      f"all quantized {full['ppl']:.4f}, prompt kept float {result['ppl']:.4f}, ratio {paired['ratio']:.4f} "
                      f"[{paired['low']:.4f}, {paired['high']:.4f}]", flush=True)
    seconds = round(time.perf_counter() - start, 1)  # the setting's two calibrations and its evaluations
    return [row | {"seconds": seconds} for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=120, help="continuations (the shared-prompt bench uses 120)")
    parser.add_argument("--seeds", default="0,1,2,3", help="rotation seeds of the rotated settings")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reader, tokenizer = open_model(default_model())
    calib = text_windows(tokenizer, default_calib(), CALIB_WINDOWS, 256, "random")
    contexts = three_contexts(tokenizer, args.windows)
    rows = measure_float(reader, contexts)
    write_rows("stories_prompt_context", rows)
    for bits in (4, 3):
        for rotate, seed in [(False, 0)] + [(True, int(seed)) for seed in args.seeds.split(",")]:
            rows += measure_quantized(reader, calib, contexts, bits, rotate, seed)
            write_rows("stories_prompt_context", rows)  # after every setting: an interrupted run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
