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

After AutoRound's quantize() the in-memory model holds its quantize-dequantized weights (in
bfloat16: AutoRound casts the model on the CPU). (0.16.1's "fake" export no longer writes them:
it defers the quantization to load time.) This script writes OUT as a plain float32 checkpoint:
the quantized linears' weights from memory, every other tensor as it was before AutoRound (what
its fake export restores too), the original config.json and the tokenizer, plus autoround.json
(version, method, bits, per-layer group sizes and shapes, seconds, resolved settings).
layerquant's evaluator then measures it exactly as it measures layerquant's output. Every linear
except lm_head must come back on a 2^bits-level grid per group, else the script fails and says
which layers AutoRound left unquantized (on stories260K it skips the 172-wide MLP layers).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402

BATCH = 8  # AutoRound's default batch size


def on_grid(weight: torch.Tensor, bits: int, group: int) -> bool:
    """Whether every group of `group` columns of every row holds at most 2^bits distinct values."""
    levels = 2**bits
    for start in range(0, weight.shape[1], group):
        values = weight[:, start : start + group].sort(dim=1).values
        distinct = 1 + (values[:, 1:] != values[:, :-1]).sum(dim=1)
        if int(distinct.max()) > levels:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--method", required=True, choices=["autoround"])
    parser.add_argument("--windows", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--iters", type=int, help="AutoRound's iterations (default: its own, 200); 0 for a quick smoke test")
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
    tokens = load_file(args.windows)["tokens"]
    batches = [tokens[start : start + BATCH] for start in range(0, tokens.shape[0], BATCH)]

    original = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    source_config = json.loads((Path(args.model) / "config.json").read_text())
    rounder = AutoRound(model, tokenizer=tokenizer, scheme="W4A16", bits=args.bits, group_size=args.group, sym=True,
                        dataset=batches, nsamples=tokens.shape[0], seqlen=tokens.shape[1], device_map="cpu",
                        **({"iters": args.iters} if args.iters is not None else {}))
    settings = {name: getattr(rounder, name) for name in ("iters", "lr", "minmax_lr", "batch_size", "amp", "enable_minmax_tuning",
                                                          "nsamples", "seqlen", "sym", "group_size", "bits", "enable_torch_compile")
                if isinstance(getattr(rounder, name, None), (int, float, bool, str))}
    quantized_model, _ = rounder.quantize()
    quantized_at = time.perf_counter()
    live = quantized_model.state_dict()
    # AutoRound casts the model to bfloat16 on the CPU; its own "fake" export restores every tensor
    # it did not quantize to the original float32. Likewise here: the quantized linears' weights
    # (on the grid, in bfloat16) and every other tensor as it was
    state = {name: tensor.float().contiguous() for name, tensor in original.items()}
    skipped = []
    for name, shape in linear.items():
        weight = live[name + ".weight"].float()
        if on_grid(weight, args.bits, args.group):
            state[name + ".weight"] = weight.contiguous()
        else:
            skipped.append(f"{name} {list(shape)}")
    if skipped:
        raise SystemExit(f"error: AutoRound {auto_round.__version__} left {len(skipped)} of {len(linear)} linear layers unquantized "
                         f"at group {args.group}, e.g. {skipped[0]} (out x in)")
    config = source_config
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    if getattr(model.config, "tie_word_embeddings", False):
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
