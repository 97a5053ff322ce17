"""Reading calibration / evaluation text and tokenizing it.

A text source (--calib, --eval) is one of
    FILE.txt                 the file's text, decoded strictly with --text-encoding
    FOLDER                   a `datasets` dataset written by save_to_disk (its first split)
    json:FILE  text:FILE     a local file read by that `datasets` builder (also csv:, parquet:)
    org/name[:config[:split]]  a hub dataset, from the local `datasets` cache (HF_DATASETS_OFFLINE=1)
                             or downloaded when online; split defaults to train
From a dataset, the --text-column (default "text") is read; a column of chat messages
([{"role", "content"}, ...], the `messages` column llm-compressor's examples calibrate on, taken
when there is no `text` column) is rendered with the tokenizer's chat template. Rows are joined
with blank lines, as the windows are cut from one token stream.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from layerquant.errors import CalibrationError, InvalidModel

FILE_BUILDERS = ("json", "text", "csv", "parquet")
CHAT_COLUMN = "messages"
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]*)?(:[\w.\[\]%:-]+)?$")


def text_source_file(source: str | os.PathLike[str]) -> str | None:
    """The local file or folder a text source reads, if any (what an output folder must not hit)."""
    spec = str(source)
    builder, _, rest = spec.partition(":")
    if builder in FILE_BUILDERS and rest and not Path(spec).exists():
        return rest
    if Path(spec).exists():
        return spec
    return None


def read_text(source: str | os.PathLike[str], encoding: str = "utf-8", text_column: str = "text", tokenizer=None) -> str:
    """The text of a source (see the module doc). A .txt file is decoded strictly: a byte that
    is not `encoding` is an error naming its offset, not a silent replacement character.
    `tokenizer` (or a function that loads it) renders chat messages."""
    spec = str(source)
    path = Path(spec)
    builder, _, rest = spec.partition(":")
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
        text = dataset_text(dataset, str(path), text_column, tokenizer)
    elif builder in FILE_BUILDERS and rest:
        text = dataset_text(load_file_dataset(builder, rest, encoding), spec, text_column, tokenizer)
    elif _HUB_DATASET.match(spec) and "/" in spec.split(":")[0] and not looks_like_a_file_name(spec):
        text = dataset_text(load_hub_dataset(spec), spec, text_column, tokenizer)
    else:
        raise CalibrationError(f"text source {spec} does not exist",
                               "pass a .txt file, a datasets folder, json:FILE / text:FILE, or a hub dataset org/name:config:split")
    if not text.strip():
        raise CalibrationError(f"text source {spec} is empty", "pass a file with real text in it")
    return text


@contextmanager
def quiet_datasets():
    """datasets' cache notices and progress bars would bury the run's own lines (and split the
    one `error:` line of bad input into several)."""
    from datasets.utils import logging as datasets_logging

    verbosity, bars = datasets_logging.get_verbosity(), datasets_logging.is_progress_bar_enabled()
    datasets_logging.set_verbosity_error()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars:
            datasets_logging.enable_progress_bar()


def looks_like_a_file_name(spec: str) -> bool:
    """data/calib.txt is a missing file, not a hub dataset named calib.txt."""
    return Path(spec.split(":")[0]).suffix.lower() in {".txt", ".json", ".jsonl", ".csv", ".parquet", ".md", ".arrow"}


def load_file_dataset(builder: str, file: str, encoding: str):
    if not Path(file).is_file():
        raise CalibrationError(f"{builder}:{file}: {file} does not exist", f"pass {builder}: a local file")
    from datasets import load_dataset

    options = {"encoding": encoding} if builder in ("json", "text") else {}
    try:
        with quiet_datasets():
            return load_dataset(builder, data_files=file, split="train", **options)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a malformed file; all are bad input
        raise CalibrationError(f"{builder}:{file} could not be read as {builder} ({type(exc).__name__}: {str(exc)[:200]})",
                               f"check the file is valid {builder}, or pass it as a plain .txt") from None


def datasets_cache_dir() -> str | None:
    """HF_DATASETS_CACHE / HF_HOME as they are now (datasets reads them once, at import)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "datasets")
    return None


def load_hub_dataset(spec: str):
    """`org/name[:config[:split]]` from the local datasets cache (offline) or the hub (online)."""
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    from datasets import load_dataset

    try:
        with quiet_datasets():
            return load_dataset(name, config or None, split=split or "train", cache_dir=datasets_cache_dir())
    except ConnectionError:
        raise CalibrationError(f"dataset {name} is not in the local datasets cache and the hub cannot be reached (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, or no network)",
                               f"load it once where the hub is reachable (datasets.load_dataset('{name}'), same HF_HOME), "
                               "or pass json:FILE / text:FILE") from None
    except Exception as exc:  # noqa: BLE001 - unknown config or split, missing dataset: bad input, said as it is
        raise CalibrationError(f"dataset {spec}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                               "check the dataset id, :config and :split") from None


def dataset_text(dataset, where: str, text_column: str, tokenizer) -> str:
    columns = list(dataset.column_names)
    column = text_column
    if column not in columns:
        if column == "text" and CHAT_COLUMN in columns:
            column = CHAT_COLUMN  # a chat dataset, as llm-compressor's examples calibrate on
        else:
            raise CalibrationError(f"dataset {where} has no {text_column!r} column", f"its columns are {columns}: pass one with --text-column")
    rows = [row for row in dataset[column] if row]
    if rows and isinstance(rows[0], list):
        rows = [render_chat(tokenizer, messages, where) for messages in rows]
    elif rows and not isinstance(rows[0], str):
        raise CalibrationError(f"column {column!r} of dataset {where} holds {type(rows[0]).__name__}, not text",
                               f"pass --text-column a text column (columns: {columns}) or a chat `messages` column")
    return "\n\n".join(rows)


def render_chat(tokenizer, messages: list[dict], where: str) -> str:
    if tokenizer is not None and not hasattr(tokenizer, "apply_chat_template"):
        tokenizer = tokenizer()  # a loader: the tokenizer is only needed here
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(f"dataset {where} holds chat messages but the model's tokenizer has no chat template",
                               "pass --text-column a plain text column, or use a model whose tokenizer_config.json "
                               "(or chat_template.jinja) has a chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template that fails on these messages: bad input
        raise CalibrationError(f"chat template failed on a row of {where} ({type(exc).__name__}: {str(exc)[:200]})",
                               "each row must be a list of {role, content} messages the template accepts") from None


def load_tokenizer(model_dir: str | os.PathLike[str]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"no usable tokenizer in {model_dir} ({exc})", "the model folder needs tokenizer.json or tokenizer.model") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)
