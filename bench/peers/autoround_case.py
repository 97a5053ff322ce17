"""One AutoRound case, run inside the AutoRound virtual environment (never the project's).

Usage: python autoround_case.py --model DIR --out DIR --method autoround --windows CALIB.safetensors --bits B --group G

--windows holds the calibration token windows layerquant uses ("tokens" [N, L] int64, the first
N x L tokens of the calibration text, BOS-prefixed): they are AutoRound's dataset, in batches of
its default batch size (8), with nsamples = N and seqlen = L, so it sees exactly the tokens the
other tools see.
  autoround  AutoRound (Intel's sign-gradient rounding, SignRound) with its defaults on the CPU
             (device_map "cpu"): scheme W4A16 with the row's bits and group size, symmetric, 200
             iterations per block, its learning rate and minmax-tuning defaults; embeddings and
             LM head float. The resolved settings are recorded in autoround.json.

AutoRound writes a "fake" checkpoint (its quantize-dequantized weights in float) to a folder next
to OUT; this script copies those weights into OUT as a plain float32 checkpoint (config.json
without quantization_config, the tokenizer) and writes autoround.json (version, method, bits,
per-layer group sizes and shapes, seconds, resolved settings), deleting the temporary folder.
layerquant's evaluator then measures it exactly as it measures layerquant's output. Every linear
except lm_head must come back changed by quantization, else the script fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402

BATCH = 8  # AutoRound's default batch size


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--method", required=True, choices=["autoround"])
    parser.add_argument("--windows", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    started = time.perf_counter()

    import auto_round
    from auto_round import AutoRound
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    linear = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    original = {n + ".weight": m.weight.detach().clone() for n, m in model.named_modules() if n in linear}
    tokens = load_file(args.windows)["tokens"]
    batches = [tokens[start : start + BATCH] for start in range(0, tokens.shape[0], BATCH)]

    scratch = args.out.with_name(f".{args.out.name}.autoround-tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        rounder = AutoRound(model, tokenizer=tokenizer, scheme="W4A16", bits=args.bits, group_size=args.group, sym=True,
                            dataset=batches, nsamples=tokens.shape[0], seqlen=tokens.shape[1], device_map="cpu")
        settings = {name: getattr(rounder, name) for name in ("iters", "lr", "minmax_lr", "batch_size", "amp", "enable_minmax_tuning",
                                                              "nsamples", "seqlen", "sym", "group_size", "bits")
                    if isinstance(getattr(rounder, name, None), (int, float, bool, str))}
        rounder.quantize_and_save(str(scratch), format="fake")
        quantized_at = time.perf_counter()
        state = {}
        for file in sorted(scratch.glob("*.safetensors")):
            state.update(load_file(file))
        state = {name: tensor.float().contiguous() for name, tensor in state.items()
                 if not name.endswith((".scale", ".zp", ".scales", ".qzeros", ".qweight", ".g_idx"))}
        unchanged = [name for name, weight in original.items() if name not in state or torch.equal(state[name], weight)]
        if unchanged:
            raise SystemExit(f"error: {len(unchanged)} linear layers were not quantized, e.g. {unchanged[0]}")
        config = json.loads((scratch / "config.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out / "model.safetensors", metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(args.out)
    # groups as AutoRound cuts them: a group wider than the layer is the whole row, a ragged last group is its own
    groups = {name: min(args.group, cols) if args.group > 0 else cols for name, (rows, cols) in linear.items()}
    (args.out / "autoround.json").write_text(json.dumps({
        "version": auto_round.__version__, "method": args.method, "bits": args.bits, "group_sizes": groups,
        "shapes": {name: list(shape) for name, shape in linear.items()}, "seconds": round(time.perf_counter() - started, 2),
        "quantize_seconds": round(quantized_at - started, 2), "settings": settings}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
