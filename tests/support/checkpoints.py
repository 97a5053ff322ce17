"""Reading an output folder's tensors whatever its format: one model.safetensors (dequantized)
or numbered shards (the packed formats)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def folder_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    for file in files:
        tensors.update(load_file(file))
    return tensors
