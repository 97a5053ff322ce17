"""One llm-compressor GPTQ case, run inside the peers virtual environment (not the project's).

Usage: python llmcompressor_case.py MODEL_DIR WINDOWS.safetensors OUT_DIR BITS GROUP [LAYER=GROUP ...]
WINDOWS holds the calibration token windows layerquant uses ("tokens" [N, L] int64), so both
tools see exactly the same calibration tokens. Writes OUT_DIR as a plain float checkpoint whose
linear weights are llm-compressor's fake-quantized ones (layerquant's evaluator then measures
both tools the same way) plus OUT_DIR/llmcompressor.json (version, per-layer group sizes).
LAYER=GROUP pairs give a layer-name suffix its own group size (stories260K's down_proj has 172
input columns: llm-compressor refuses ragged groups, so 43 there).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> int:
    model_dir, windows_path, out_dir, bits, group = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    special = dict(pair.split("=") for pair in sys.argv[6:])
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokens = load_file(windows_path)["tokens"]
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    groups = {"default": {"targets": [f"re:.*({'|'.join(sorted({n.rsplit('.', 1)[-1] for n in linear_names} - set(special)))})$"],
                          "weights": weights}}
    for index, (suffix, size) in enumerate(special.items()):
        groups[f"special{index}"] = {"targets": [f"re:.*{suffix}$"], "weights": {**weights, "group_size": int(size)}}
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=tokens.shape[1], num_calibration_samples=tokens.shape[0])

    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    layer_groups = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
            zero = getattr(module, "weight_zero_point", None)
            with torch.no_grad():
                module.weight.copy_(fake_quantize(module.weight, module.weight_scale, zero, scheme.weights))
            layer_groups[name] = scheme.weights.group_size
    for name, tensor in model.state_dict().items():
        if name.endswith((".weight_scale", ".weight_zero_point", ".weight_g_idx")) or "observer" in name:
            continue
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        state[name] = tensor.detach().contiguous().float()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out_dir)
    (out_dir / "llmcompressor.json").write_text(json.dumps({"version": llmcompressor.__version__, "group_sizes": layer_groups}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
