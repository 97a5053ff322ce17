"""Reading calibration / evaluation text and tokenizing it (file or `datasets` folder on disk)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from layerquant.errors import CalibrationError, InvalidModel


def read_text(source: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    """Text from a .txt file (decoded strictly: a byte that is not `encoding` is an error, not a
    silent replacement character), or from the `text` column of a `datasets` dataset saved on disk."""
    path = Path(source)
    if path.is_file():
        data = path.read_bytes()
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"text {path} is not valid {encoding}: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason})",
                                   "fix the file, or pass --text-encoding with its real encoding (e.g. latin-1)") from None
    elif path.is_dir():
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise CalibrationError(f"{path} is not a datasets folder ({exc})", "pass a .txt file or a folder written by Dataset.save_to_disk") from None
        if hasattr(dataset, "keys"):  # DatasetDict: take the first split
            dataset = dataset[sorted(dataset.keys())[0]]
        if "text" not in dataset.column_names:
            raise CalibrationError(f"dataset {path} has no 'text' column", f"its columns are {dataset.column_names}")
        text = "\n\n".join(row for row in dataset["text"] if row)
    else:
        raise CalibrationError(f"text source {path} does not exist", "pass a .txt file or a datasets folder")
    if not text.strip():
        raise CalibrationError(f"text source {path} is empty", "pass a file with real text in it")
    return text


def load_tokenizer(model_dir: str | os.PathLike[str]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"no usable tokenizer in {model_dir} ({exc})", "the model folder needs tokenizer.json or tokenizer.model") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)
