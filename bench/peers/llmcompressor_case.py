"""One llm-compressor case, run inside the peers virtual environment (never the project's).

Usage: python llmcompressor_case.py --model DIR --out DIR --method gptq|awq|rtn|float
                                    [--windows CALIB.safetensors] [--bits B] [--group G] [--special SUFFIX=G ...]
                                    [--act-bits A] [--smooth]

--windows holds the calibration token windows layerquant uses ("tokens" [N, L] int64, the first
N x L tokens of the calibration text, BOS-prefixed), so both tools see exactly the same tokens.
  gptq   GPTQModifier with its defaults (act-order "static", dampening 0.01, block 128, minmax
         observer), symmetric int weights, one scale per group, embeddings and LM head float.
  awq    AWQModifier (llm-compressor's transform: activation-aware channel scales found by its grid
         search, defaults: n_grid 20, duo_scaling, mappings resolved from the architecture) then
         QuantizationModifier, as in llm-compressor's AWQ examples; asymmetric int weights (AWQ's
         usual W4A16_ASYM: a scale and a zero point per group; --sym for symmetric), same windows.
  rtn    QuantizationModifier, the same scheme (absmax scales per group, round to nearest),
         data-free.
  --act-bits A  weight-activation scheme (issue 16): dynamic symmetric per-token int A-bit input
         activations at every quantized linear (compressed-tensors `input_activations`); they are
         computed at run time, so the written weights are the same kind as above and the evaluator
         applies the same per-token quantization (bench/gemma_bisup.py).
  --smooth  SmoothQuantModifier (llm-compressor's default strength 0.5 and its mappings for the
         architecture) before GPTQ, as in its W8A8 examples.
  float  no quantization: the model only goes through this environment's load and save path
         (checks that the path itself changes nothing).
AWQ on a machine without an accelerator: llm-compressor 0.14.0.1's AWQ pins its cached
activations (`IntermediatesCache.pin_memory`, for non-blocking host-to-GPU copies), which a
CPU-only torch refuses ("Cannot access accelerator device when none is available"). Pinning only
speeds transfers and changes no value, so on a machine without CUDA it is made a no-op here
(recorded as patched_pin_memory in llmcompressor.json).
--special gives layers ending in SUFFIX their own group size: stories260K's down_proj has 172
input columns and llm-compressor refuses a group size that does not divide the columns.

OUT receives a plain float32 checkpoint whose linear weights are llm-compressor's fake-quantized
weights (quantize then dequantize with its own scales; scale/zero tensors dropped), config without
quantization_config, the tokenizer, and llmcompressor.json (version, per-layer group sizes and
shapes). layerquant's evaluator then measures it exactly as it measures layerquant's output.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--method", required=True, choices=["gptq", "awq", "rtn", "float"])
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (a zero point per group); AWQ's default")
    parser.add_argument("--windows")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--special", nargs="*", default=[])
    parser.add_argument("--act-bits", type=int, default=16, help="dynamic per-token int activations (16 = float)")
    parser.add_argument("--smooth", action="store_true", help="SmoothQuantModifier before GPTQ")
    args = parser.parse_args()
    started = time.perf_counter()

    import llmcompressor
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    linear = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    special = {suffix: int(size) for suffix, size in (pair.split("=") for pair in args.special)}
    layer_groups: dict[str, int] = {}
    patched: list[str] = []
    if args.method != "float":
        from llmcompressor import oneshot

        weights = {"num_bits": args.bits, "type": "int", "symmetric": not args.asym, "strategy": "group", "group_size": args.group}
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
        plain = [s for s in suffixes if s not in special]
        groups = {"default": {"targets": [f"re:.*\\.({'|'.join(plain)})$"], "weights": weights}}
        if args.act_bits < 16:
            groups["default"]["input_activations"] = {"num_bits": args.act_bits, "type": "int", "symmetric": True, "strategy": "token",
                                                      "dynamic": True}
        for index, (suffix, size) in enumerate(sorted(special.items())):
            groups[f"special{index}"] = {"targets": [f"re:.*\\.{suffix}$"], "weights": {**weights, "group_size": size}}
        if args.method in ("gptq", "awq"):
            from datasets import Dataset
            from llmcompressor.modifiers.gptq import GPTQModifier
            from llmcompressor.modifiers.quantization import QuantizationModifier
            from llmcompressor.modifiers.transform.awq import AWQModifier

            tokens = load_file(args.windows)["tokens"]
            dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
            if args.method == "gptq":
                recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
                if args.smooth:
                    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

                    recipe = [SmoothQuantModifier(), recipe]
            else:  # the smoothing transform first, then the quantization it was searched for
                recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
                if not torch.cuda.is_available():
                    from llmcompressor.pipelines.cache import IntermediatesCache

                    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
                    patched.append("pin_memory")
            oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=tokens.shape[1], num_calibration_samples=tokens.shape[0])
        else:
            from llmcompressor.modifiers.quantization import QuantizationModifier

            oneshot(model=model, recipe=QuantizationModifier(config_groups=groups, ignore=["lm_head"]))

        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            if not hasattr(module, "weight_scale"):
                raise SystemExit(f"error: {name} has a quantization scheme but no weight_scale")
            with torch.no_grad():
                # GPTQ has already written its quantized weights (this is then a no-op on the grid);
                # RTN's and AWQ's (smoothed) are still float and become quantize-dequantize of them
                module.weight.copy_(fake_quantize(module.weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                                                  scheme.weights))
            layer_groups[name] = scheme.weights.group_size
        missing = sorted(set(linear) - set(layer_groups))
        if missing:
            raise SystemExit(f"error: {len(missing)} linear layers were not quantized, e.g. {missing[0]}")

    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith((".weight_scale", ".weight_zero_point", ".weight_g_idx", ".weight_global_scale", ".input_scale",
                          ".input_zero_point")) or "observer" in name:
            continue
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        state[name] = tensor.detach().contiguous().float()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(args.out)
    (args.out / "llmcompressor.json").write_text(json.dumps({
        "version": llmcompressor.__version__, "method": args.method, "bits": args.bits, "asym": args.asym,
        "act_bits": args.act_bits, "smooth": args.smooth, "group_sizes": layer_groups,
        "shapes": {name: list(shape) for name, shape in linear.items()}, "seconds": round(time.perf_counter() - started, 2),
        **({"patched_pin_memory": True} if patched else {})}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
