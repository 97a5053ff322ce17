"""Peak memory of a full run on a synthesized model much larger than a block.

Synthesizes a 24-block float32 Llama (random weights, sharded safetensors; hidden 1536 = 2.6 GB
by default, --hidden 2048 --intermediate 5632 = 4.9 GB), then runs
`layerquant quantize` on it with 16 x 256 calibration tokens and measures the peak RSS of the
whole process tree (the Prefect ephemeral server included).

Run: .venv/bin/python bench/memory_streaming.py [--workdir DIR] [--hidden H --intermediate I]
(2.6 GB: 61 min on 2 cores shared with other jobs; the peak RSS does not depend on the load)
Writes bench/results/memory_streaming.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import commit, conditions, load_rows, machine, run_measured, write_rows  # noqa: E402

BLOCKS, VOCAB = 24, 512


def synthesize(folder: Path, hidden: int, intermediate: int, blocks: int = BLOCKS) -> int:
    """Write the model block by block (never whole in memory); returns its size in bytes."""
    from layerquant.config import default_model

    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    scale = hidden**-0.5
    weight_map, total = {}, 0

    def save(shard: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())

    shards = blocks + 1
    save(f"model-00001-of-{shards:05d}.safetensors", {
        "model.embed_tokens.weight": torch.randn(VOCAB, hidden, generator=generator),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.randn(VOCAB, hidden, generator=generator) * scale,
    })
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    for index in range(blocks):
        tensors = {f"model.layers.{index}.{name}.weight": torch.randn(*shape, generator=generator) * shape[1] ** -0.5
                   for name, shape in shapes.items()}
        tensors[f"model.layers.{index}.input_layernorm.weight"] = torch.ones(hidden)
        tensors[f"model.layers.{index}.post_attention_layernorm.weight"] = torch.ones(hidden)
        save(f"model-{index + 2:05d}-of-{shards:05d}.safetensors", tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    heads = hidden // 128
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": blocks, "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": VOCAB,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(Path(default_model()) / name, folder / name)
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lq-membench-"))
    model = workdir / "model"
    size = synthesize(model, args.hidden, args.intermediate) if not (model / "config.json").exists() else sum(p.stat().st_size for p in model.glob("*.safetensors"))
    command = [str(Path(sys.executable).parent / "layerquant"), "quantize", "--model", str(model), "--nsamples", "16", "--seqlen", "256",
               "--eval-windows", "2", "--eval-seqlen", "256", "--bits", "4", "--group-size", "128",
               "--store", str(workdir / "store"), "--out", str(workdir / "out"), "--overwrite"]
    shutil.rmtree(workdir / "store", ignore_errors=True)  # measure a cold run, not cache hits
    at_start = conditions()
    result = run_measured(command, env=dict(os.environ))
    if result["returncode"] != 0:
        print(result["stderr"][-3000:], file=sys.stderr)
        return 1
    report = json.loads((workdir / "out" / "report.json").read_text())
    row = {
        "bench": "memory_streaming", "tool": "layerquant", "tool_version": "0.1.0", "model": f"synthetic-llama-{BLOCKS}x{args.hidden}",
        "model_mb": round(size / 2**20, 1), "n_blocks": BLOCKS, "method": "gptq", "bits": 4, "group_size": 128,
        "avg_bits": report["avg_bits"], "nsamples": 16, "seqlen": 256, "wall_s": result["wall_s"],
        "peak_rss_mb": result["peak_rss_mb"], "peak_rss_main_mb": result["peak_rss_main_mb"],
        "peak_rss_fraction_of_model": round(result["peak_rss_mb"] / (size / 2**20), 3), "workers": 1,
        **at_start, "machine": machine(), "commit": commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(row, indent=2))
    # appended: a model's earlier rows stay as the record of how its memory moved (the newest
    # row of a model is its current figure)
    write_rows("memory_streaming", load_rows("memory_streaming") + [row])
    shutil.rmtree(workdir / "out", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
