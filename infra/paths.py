"""Checks on the folders a command writes, made before any work starts.

One function, `check_output_folder`, decides whether `--out` may be (re)written by quantize,
retry and pack: nothing the user did not create for a layerquant run may be deleted. An existing
non-empty folder needs --overwrite; --overwrite refuses a folder that is, contains or lies
inside the artifact store, the model folder or the texts, or that is or contains the current
directory, and (unless --force) a folder that is not one of our outputs: no report.json, or
files that no layerquant output has (the user's own notes, say).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from layerquant.errors import InvalidPath, UnsafeOutput

# what quantize / pack write into an output folder (shards are matched by suffix)
OUTPUT_FILES = {
    "report.json", "config.json", "model.safetensors.index.json", "quantize_config.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
}


def _file_above(path: Path) -> Path | None:
    """The first existing non-folder among `path`'s ancestors (then nothing can be made under it)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_folder_path(location: str | os.PathLike[str], flag: str) -> Path:
    """`location` can be (or become) a folder: it is not a file and not under one."""
    path = Path(location).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise InvalidPath(f"{flag} {path} is a file, not a folder", f"pass {flag} a folder path")
    blocker = _file_above(path)
    if blocker is not None:
        raise InvalidPath(f"{flag} {path} lies under the regular file {blocker}", f"pass {flag} a path whose parents are folders")
    return path


def check_store_location(location: str | None) -> None:
    if location and not location.startswith("s3://"):
        check_folder_path(location, "--store")


def _related(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "lies inside"
    return None


def foreign_entries(folder: Path) -> list[str]:
    """Entries of an output folder that no layerquant output has."""
    return sorted(p.name for p in folder.iterdir()
                  if not (p.is_file() and (p.name in OUTPUT_FILES or p.name.endswith(".safetensors"))))


def check_output_folder(out: str | os.PathLike[str], *, overwrite: bool = False, force: bool = False,
                        protected: Iterable[tuple[str, str | os.PathLike[str] | None]] = ()) -> Path:
    """Raise unless `out` may receive a new output folder (see the module doc).

    `protected`: (what, path) pairs the output must stay clear of: the store, the model folder,
    the calibration and evaluation texts (S3 locations and None are skipped). The current
    directory is always protected."""
    path = check_folder_path(out, "--out")
    guarded = [(what, Path(p).expanduser().resolve()) for what, p in protected if p and not str(p).startswith("s3://")]
    for what, other in guarded:
        relation = _related(path, other)
        if relation is not None:
            raise UnsafeOutput(f"--out {path} {relation} the {what} {other}", "choose an output folder of its own")
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise UnsafeOutput(f"--out {path} {'is' if path == cwd else 'contains'} the current directory",
                           "choose an output folder of its own")
    if not path.exists() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise UnsafeOutput(f"output folder {path} exists and is not empty", "pass --overwrite or choose another --out")
    if not force:
        if not (path / "report.json").is_file():
            raise UnsafeOutput(f"output folder {path} does not look like a layerquant output (no report.json)",
                               "--overwrite only replaces earlier outputs; pass --force to replace it anyway, or choose another --out")
        foreign = foreign_entries(path)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UnsafeOutput(f"output folder {path} holds files layerquant did not write ({shown})",
                               "move them away, or pass --force to delete them with the old output")
    return path


def current_umask() -> int:
    try:  # read, not set-and-restore: other threads may be creating files
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_the_umask(folder: Path) -> None:
    """Files as any program writes them (0644 under the usual umask 022): some writers (the
    safetensors library, temp files) create them 0600, unreadable to the engine that serves them."""
    mask = current_umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
