"""Lazy access to a Hugging Face model folder (single or sharded safetensors), and streaming
writes of a new model folder, one tensor group at a time. The whole model is never in memory.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from layerquant.architectures import Architecture, architecture_for, load_config
from layerquant.errors import InvalidModel
from layerquant.infra.paths import share_like_the_umask

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def _check_safetensors_file(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and sanity-check a safetensors header; catches truncated and garbage files early.

    Returns the header and the offset where tensor data starts (after the length and header)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"{path} is not a valid safetensors file ({exc})", "re-download or re-save the model") from None
    end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise InvalidModel(
            f"{path} is truncated or corrupt ({size} bytes, header says {8 + header_len + end})",
            "re-download or re-save the model",
        )
    return header, 8 + header_len


class CheckpointReader:
    """Reads tensors by name from a model folder on demand."""

    def __init__(self, model_dir: str | os.PathLike[str],
                 unpack_layers: Callable[[str, dict[str, torch.Tensor], dict], dict[str, torch.Tensor]] | None = None):
        """`unpack_layers(prefix, tensors, quantization_config)` turns a packed folder's block
        tensors (compressed-tensors, GPTQ) into float weights; the caller supplies it because
        the formats are kernels' knowledge and this reader only does I/O."""
        self.model_dir = Path(model_dir)
        self.unpack_layers = unpack_layers
        if not self.model_dir.is_dir():
            raise InvalidModel(f"model folder {self.model_dir} does not exist", "pass --model a Hugging Face model folder")
        config_path = self.model_dir / "config.json"
        if not config_path.is_file():
            raise InvalidModel(f"{self.model_dir} has no config.json", "pass a Hugging Face model folder (config.json + *.safetensors)")
        try:
            self.config_dict: dict[str, Any] = json.loads(config_path.read_text())
        except ValueError as exc:
            raise InvalidModel(f"{config_path} is not valid JSON ({exc})", "fix or re-download config.json") from None
        self.arch: Architecture = architecture_for(self.config_dict.get("model_type", "<missing>"))
        self.config = load_config(self.config_dict)
        self.weight_map = self._weight_map()
        parsed = {shard: _check_safetensors_file(self.model_dir / shard) for shard in sorted(set(self.weight_map.values()))}
        self.headers = {shard: header for shard, (header, _) in parsed.items()}
        self._data_start = {shard: start for shard, (_, start) in parsed.items()}

    def _weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for shard in set(weight_map.values()):
                if not (self.model_dir / shard).is_file():
                    raise InvalidModel(f"shard {shard} listed in {INDEX_NAME} is missing", "re-download the model")
            return dict(weight_map)
        single = self.model_dir / SINGLE_NAME
        if single.is_file():
            header, _ = _check_safetensors_file(single)
            return {name: SINGLE_NAME for name in header if name != "__metadata__"}
        raise InvalidModel(
            f"{self.model_dir} has no {SINGLE_NAME} or {INDEX_NAME}",
            "layerquant reads safetensors checkpoints; convert .bin weights with save_pretrained(safe_serialization=True)",
        )

    @property
    def n_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Full name -> [out, in] of every quantized linear layer, from the headers alone."""
        shapes = {}
        for index in range(self.n_blocks):
            for name in self.arch.linear_names:
                full = self.block_prefix(index) + name + ".weight"
                if self.has(full):
                    shape = self.headers[self.weight_map[full]][full]["shape"]
                    shapes[full[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
        return shapes

    def block_float32_bytes(self) -> int | None:
        """The float32 size of the largest block's quantized linears, from the headers (None when
        the checkpoint has no plain linear weights, e.g. a packed one)."""
        shapes = self.linear_shapes()
        sizes = [sum(4 * rows * cols for name, (rows, cols) in shapes.items() if name.startswith(self.block_prefix(index)))
                 for index in range(self.n_blocks)]
        return max(sizes, default=0) or None

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read with plain file reads.

        Not mmap: pages of a memory-mapped checkpoint stay resident and count towards the
        process's memory, which would grow to the model's size over a run.
        """
        shard = self.weight_map.get(name)
        if shard is None:
            raise InvalidModel(f"tensor {name} is not in {self.model_dir}", "the checkpoint does not match its config.json")
        header = self.headers[shard]
        info = header[name]
        begin, end = info["data_offsets"]
        data_start = self._data_start[shard]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise InvalidModel(f"tensor {name} has unsupported dtype {info['dtype']}", "convert the checkpoint to F32/F16/BF16")
        buffer = bytearray(end - begin)
        with (self.model_dir / shard).open("rb") as handle:
            handle.seek(data_start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise InvalidModel(f"{self.model_dir / shard} ended early while reading {name}", "re-download the model")
        if not buffer:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])

    def block_prefix(self, index: int) -> str:
        return self.arch.block_prefix.format(index=index)

    def block_tensor_names(self, index: int) -> list[str]:
        prefix = self.block_prefix(index)
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    def block_weights(self, index: int, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Block-relative names -> tensors (cast to `dtype` for computation)."""
        prefix = self.block_prefix(index)
        names = self.block_tensor_names(index)
        if not names:
            raise InvalidModel(f"block {index} has no weights under {prefix}", "the checkpoint does not match its config.json")
        out = {}
        quant_config = self.config_dict.get("quantization_config")
        for name in names:
            t = self.tensor(name)
            # min and max carry any NaN or Inf through: one pass with no tensor-sized temporary,
            # a tenth of isfinite(t).all()'s time, which ran on every read of every block
            if t.is_floating_point() and t.numel() and not all(bool(torch.isfinite(bound)) for bound in torch.aminmax(t)):
                bad = (~torch.isfinite(t)).nonzero()[0].tolist()
                kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise InvalidModel(f"tensor {name} of {self.model_dir} holds {kind} values (first at index {bad})",
                                   "the checkpoint is damaged or diverged: re-download it or use an earlier one")
            keep = quant_config and not t.is_floating_point()  # packed codes stay integers until dequantized
            out[name[len(prefix) :]] = t.to(dtype) if dtype is not None and not keep else t
        if quant_config:
            # a packed folder (ours or another tool's): its layers read back dequantized
            if self.unpack_layers is None:
                raise InvalidModel(f"{self.model_dir} holds packed (quantized) weights",
                                   "open it through a task context (layerquant eval), which knows the packed formats")
            out = {name: t.to(dtype) if dtype is not None and t.is_floating_point() else t
                   for name, t in self.unpack_layers(prefix, out, quant_config).items()}
        return out

    def embed_weight(self) -> torch.Tensor:
        return self.tensor(self.arch.embed_name).float()

    def final_norm_weight(self) -> torch.Tensor:
        return self.tensor(self.arch.final_norm_name).float()

    def lm_head_weight(self) -> torch.Tensor:
        if self.has(self.arch.lm_head_name):
            return self.tensor(self.arch.lm_head_name).float()
        return self.embed_weight()  # tied embeddings

    def fingerprint(self, names: Iterable[str]) -> str:
        """sha256 over the raw bytes (and dtype/shape) of the named tensors: a content address."""
        return tensors_fingerprint((name, self.tensor(name)) for name in sorted(names))

    def config_fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.config_dict, sort_keys=True).encode()).hexdigest()

    def shape_of(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its file's header (nothing read)."""
        return tuple(int(n) for n in self.headers[self.weight_map[name]][name]["shape"])

    def dtype_of(self, name: str) -> torch.dtype:
        info = self.headers[self.weight_map[name]][name]
        return SAFETENSORS_DTYPES[info["dtype"]]


def tensors_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of tensors, hashed in place (no byte copies)."""
    digest = hashlib.sha256()
    for name, t in named_tensors:
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


# safetensors' dtype names (the format's header) and torch's
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a sibling temp folder; on success it replaces `out_dir` in one rename, on any error it
    is removed, so a failed run never leaves a half-written output folder behind."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        yield tmp_dir
        share_like_the_umask(tmp_dir)
        if out_dir.exists():
            # the old folder moves aside first: at every moment one complete output is in place
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp_dir, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors_streaming(path: Path, specs: list[tuple[str, torch.dtype, list[int]]], produce: Callable[[str], torch.Tensor]) -> int:
    """Write a safetensors file whose tensors are produced one at a time.

    The header is computed from (name, dtype, shape) up front, then each tensor's bytes are
    appended, so memory holds one tensor, not the whole shard. Returns the bytes of tensor data.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data 8-byte aligned, as the format recommends
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, dtype, shape in specs:
            tensor = produce(name)
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise ValueError(f"{name}: produced {tensor.dtype}{list(tensor.shape)}, header says {dtype}{list(shape)}")
            if tensor.numel():
                handle.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    return offset


def write_model_streaming(
    reader: CheckpointReader,
    target_dir: Path,
    replace: Callable[[str], torch.Tensor | None],
    extra_config: dict[str, Any] | None = None,
    max_shard_bytes: int = 2 << 30,
) -> None:
    """Write a copy of `reader`'s model into `target_dir` with some tensors replaced.

    replace(name) returns the new tensor (cast to the original dtype), or None to keep the
    original. Memory holds one tensor at a time (use `atomic_output_dir` for all-or-nothing).
    """
    entries = []
    for name in sorted(reader.weight_map):
        info = reader.headers[reader.weight_map[name]][name]
        entries.append((name, reader.dtype_of(name), info["shape"], info["data_offsets"][1] - info["data_offsets"][0]))
    shard_groups: list[list[tuple[str, torch.dtype, list[int]]]] = [[]]
    shard_bytes = 0
    for name, dtype, shape, size in entries:
        if shard_groups[-1] and shard_bytes + size > max_shard_bytes:
            shard_groups.append([])
            shard_bytes = 0
        shard_groups[-1].append((name, dtype, shape))
        shard_bytes += size

    def produce(name: str) -> torch.Tensor:
        new = replace(name)
        return reader.tensor(name) if new is None else new.to(reader.dtype_of(name))

    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(shard_groups):
        shard_name = SINGLE_NAME if len(shard_groups) == 1 else f"model-{i + 1:05d}-of-{len(shard_groups):05d}.safetensors"
        total += write_safetensors_streaming(target_dir / shard_name, group, produce)
        weight_map.update({name: shard_name for name, _, _ in group})
    if len(shard_groups) > 1:
        (target_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = dict(reader.config_dict)
    config.update(extra_config or {})
    write_json(target_dir / "config.json", config)
    copy_tokenizer_files(reader.model_dir, target_dir)


def write_json(path: Path, data: Any) -> None:
    """A JSON file of a written model folder (config.json, report.json, ...), indented for people."""
    path.write_text(json.dumps(data, indent=2))


def copy_tokenizer_files(model_dir: Path, target_dir: Path) -> None:
    for fname in TOKENIZER_FILES:
        if (model_dir / fname).is_file():
            shutil.copy2(model_dir / fname, target_dir / fname)


class ShardedCheckpointWriter:
    """Writes a model folder whose shards arrive one at a time (named
    model-0000i-of-0000n.safetensors in order), then its index over every tensor written, its
    JSON files and the source model's tokenizer files. Memory holds the shard being written;
    use inside `atomic_output_dir` for all-or-nothing."""

    def __init__(self, target_dir: Path, n_shards: int):
        self.target_dir = Path(target_dir)
        self.n_shards = n_shards
        self.weight_map: dict[str, str] = {}
        self._written = 0

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> str:
        if self._written == self.n_shards:
            raise ValueError(f"all {self.n_shards} shards are written already")
        self._written += 1
        shard_name = f"model-{self._written:05d}-of-{self.n_shards:05d}.safetensors"
        save_file(tensors, self.target_dir / shard_name, metadata={"format": "pt"})
        self.weight_map.update({name: shard_name for name in tensors})
        return shard_name

    def finish(self, json_files: dict[str, Any], tokenizer_dir: Path) -> None:
        """The index, `json_files` (file name -> content) and the tokenizer files of `tokenizer_dir`."""
        if self._written != self.n_shards:
            raise ValueError(f"{self._written} of {self.n_shards} shards written: the index would name missing files")
        write_json(self.target_dir / INDEX_NAME, {"metadata": {}, "weight_map": self.weight_map})
        for name, data in json_files.items():
            write_json(self.target_dir / name, data)
        copy_tokenizer_files(Path(tokenizer_dir), self.target_dir)
