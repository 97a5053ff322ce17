"""Content-addressed artifact store: one interface, a local-folder backend here, S3 in s3_store.

Layout under the store root:
    cas/{stage}/{key[:2]}/{key}.{safetensors|json}     the artifact bytes
    cas/{stage}/{key[:2]}/{key}.sha256.json            commit record: sha256, size, kind, meta
    runs/{run_id}/manifest.json                        a readable, mutable per-run index

An artifact exists only once its commit record exists; the record is written after the bytes,
and each write is atomic (temp file + rename locally, single PUT / completed multipart on S3),
so a worker killed mid-write leaves either nothing or an uncommitted blob that is overwritten
next time. Every read checks the bytes against the recorded sha256; a mismatch discards the
artifact and raises ArtifactCorrupt so the caller recomputes it. Nothing is ever unpickled:
tensors are safetensors, metadata is JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from layerquant.errors import ArtifactCorrupt, ArtifactMissing
from layerquant.infra.checkpoint import SAFETENSORS_DTYPES
from layerquant.infra.paths import check_folder_path, current_umask
from layerquant.specs import ArtifactRef, canonical_json

TENSORS = "tensors"
JSON = "json"
_EXT = {TENSORS: "safetensors", JSON: "json"}


def artifact_key(stage: str, code_version: str, upstream: list[str] | dict[str, str], params: Any) -> str:
    """Content address of an artifact: what produced it and from what, never when or where."""
    payload = canonical_json({"stage": stage, "code": code_version, "upstream": upstream, "params": params})
    return hashlib.sha256(payload.encode()).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore(ABC):
    """Backend-independent logic; subclasses move bytes."""

    # -- bytes: what a backend implements ------------------------------------------------------
    @abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomically create or replace `path` with `data`."""

    @abstractmethod
    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` only if nothing is there: True if this call created it, False
        if it existed. Atomic against every other writer of the store (leases rest on it)."""

    @abstractmethod
    def read_bytes(self, path: str) -> bytes | None:
        """The bytes at `path`, or None if absent."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove `path` if present."""

    @abstractmethod
    def list_paths(self, prefix: str) -> list[str]:
        """Paths under `prefix` (store-relative)."""

    @abstractmethod
    def describe(self) -> str:
        """Where the store is, for logs (never includes credentials)."""

    # -- artifacts -----------------------------------------------------------------------------
    @staticmethod
    def data_path(stage: str, key: str, kind: str) -> str:
        return f"cas/{stage}/{key[:2]}/{key}.{_EXT[kind]}"

    @staticmethod
    def record_path(stage: str, key: str) -> str:
        return f"cas/{stage}/{key[:2]}/{key}.sha256.json"

    def _commit(self, stage: str, key: str, kind: str, data: bytes, meta: dict[str, Any]) -> ArtifactRef:
        path = self.data_path(stage, key, kind)
        digest = sha256_bytes(data)
        self.write_bytes(path, data)
        record = {"uri": path, "sha256": digest, "kind": kind, "size": len(data), "meta": meta}
        self.write_bytes(self.record_path(stage, key), json.dumps(record, sort_keys=True).encode())
        return ArtifactRef(uri=path, sha256=digest, kind=kind, meta=meta)

    def put_tensors(self, stage: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> ArtifactRef:
        meta = dict(meta or {})
        contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        # meta (which may hold timings) goes in the commit record, not the bytes: the same
        # tensors always give the same bytes and the same sha256
        data = save_safetensors(contiguous)
        return self._commit(stage, key, TENSORS, data, meta)

    def put_json(self, stage: str, key: str, obj: Any, meta: dict[str, Any] | None = None) -> ArtifactRef:
        data = canonical_json(obj).encode()
        return self._commit(stage, key, JSON, data, dict(meta or {}))

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The committed artifact for (stage, key), or None. Does not read the data."""
        raw = self.read_bytes(self.record_path(stage, key))
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            return ArtifactRef(uri=record["uri"], sha256=record["sha256"], kind=record["kind"], meta=record.get("meta", {}))
        except (ValueError, KeyError):
            # a torn or foreign record is treated as "not there": the artifact is recomputed
            self.delete(self.record_path(stage, key))
            return None

    def verified_bytes(self, ref: ArtifactRef) -> bytes:
        """The artifact's bytes, checked against its recorded sha256 (a mismatch discards it)."""
        data = self.read_bytes(ref.uri)
        if data is None:
            raise ArtifactMissing(f"artifact {ref.uri} is not in the store {self.describe()}", "re-run the stage that produces it")
        actual = sha256_bytes(data)
        if actual != ref.sha256:
            self.discard(ref)
            raise ArtifactCorrupt(ref.uri, ref.sha256, actual)
        return data

    def discard(self, ref: ArtifactRef) -> None:
        """Forget an artifact: its record first, so nobody trusts the bytes in between."""
        if ref.uri.startswith("cas/"):
            stem = ref.uri.rsplit(".", 1)[0]
            self.delete(stem + ".sha256.json")
        self.delete(ref.uri)

    def get_tensors(self, ref: ArtifactRef) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        data = self.verified_bytes(ref)
        # a writable buffer (a local store's read) is shared by the tensors, not copied: half the
        # memory of reading a Gram sum or a block's activations
        return (tensors_over_buffer(data) if isinstance(data, bytearray) else load_safetensors(data)), dict(ref.meta)

    def get_json(self, ref: ArtifactRef) -> Any:
        return json.loads(self.verified_bytes(ref))

    # -- per-run manifests (mutable, human-readable) -----------------------------------------------
    def write_manifest(self, run_id: str, manifest: dict[str, Any]) -> None:
        self.write_bytes(f"runs/{run_id}/manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())

    def read_manifest(self, run_id: str) -> dict[str, Any] | None:
        raw = self.read_bytes(f"runs/{run_id}/manifest.json")
        return None if raw is None else json.loads(raw)


def tensors_over_buffer(data: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `data`, as views of it (no copy): the format
    is an 8-byte header length, a JSON header of dtype / shape / byte offsets per tensor, then
    the tensors' bytes, aligned for their dtypes. The tensors keep `data` alive."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + header_len]))
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=base + start) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    return tensors


class LocalStore(ArtifactStore):
    """A folder on a local (or shared network) file system."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = check_folder_path(root, "--store")
        self.root.mkdir(parents=True, exist_ok=True)
        self._mode = 0o666 & ~current_umask()

    def _full(self, path: str) -> Path:
        full = (self.root / path).resolve()
        if self.root not in full.parents and full != self.root:
            raise ValueError(f"path {path!r} escapes the store root")
        return full

    def write_bytes(self, path: str, data: bytes) -> None:
        full = self._full(path)
        full.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=full.parent, prefix=f".{full.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, self._mode)  # mkstemp makes 0600; a store is shared like any folder
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, full)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def create_exclusive(self, path: str, data: bytes) -> bool:
        full = self._full(path)
        full.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=full.parent, prefix=f".{full.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, self._mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            # a hard link appears complete or not at all, and fails if the name is taken, on
            # local disks and NFS alike (unlike rename, which replaces)
            os.link(tmp, full)
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_bytes(self, path: str) -> bytearray | None:
        """The file's bytes in a writable buffer: tensors read from it share its memory."""
        try:
            with open(self._full(path), "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                data = bytearray(size)
                if handle.readinto(data) != size:
                    raise OSError(f"{path}: short read (the file changed while it was read)")
                return data
        except FileNotFoundError:
            return None

    def delete(self, path: str) -> None:
        self._full(path).unlink(missing_ok=True)

    def list_paths(self, prefix: str) -> list[str]:
        base = self._full(prefix) if prefix else self.root
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))

    def describe(self) -> str:
        return str(self.root)


def open_store(location: str) -> ArtifactStore:
    """`s3://bucket/prefix` opens the S3 backend (endpoint and credentials from AWS_* variables);
    anything else is a local folder."""
    if location.startswith("s3://"):
        from layerquant.infra.s3_store import S3Store  # boto3 is only needed for S3 stores

        return S3Store.from_uri(location)
    return LocalStore(location)
