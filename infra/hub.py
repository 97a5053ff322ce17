"""`--model org/name`: a model on the Hugging Face Hub, found through huggingface_hub's cache.

The cache is asked first (no network: a cached snapshot is used as it is, as transformers does
offline); only a model that is not cached is downloaded, and only when the hub may be reached
(HF_HUB_OFFLINE unset). What comes back is the snapshot folder, which every other part of
layerquant reads like any local model folder; its path names the exact commit, so the run's id
follows the revision.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from layerquant.errors import InvalidModel, LayerquantError

# what a causal LM needs to be read and tokenized; a repository's other files (PyTorch .bin
# duplicates, ONNX exports, READMEs with images) are not downloaded
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubUnavailable(LayerquantError):
    """The hub could not be reached while downloading a model that is not cached."""

    transient = True


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but at call time (tests and callers set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and ".." not in model


def resolve_model(model: str, revision: str | None = None) -> str:
    """A local folder as it is; `org/name` (no such folder here) as the folder of its snapshot
    in the hub cache, downloaded first if it is not there and the hub may be reached."""
    if Path(model).expanduser().exists() or not looks_like_repo_id(model):
        if revision is not None:
            raise InvalidModel(f"--revision {revision} was given for the local folder {model}",
                               "--revision selects a commit, branch or tag of a hub model (--model org/name)")
        return model
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    cache = hub_cache_dir()
    at = f" at revision {revision}" if revision else ""
    try:
        return snapshot_download(model, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        if hub_offline():
            raise InvalidModel(
                f"model {model}{at} is neither a local folder nor in the Hugging Face cache {cache}, and HF_HUB_OFFLINE=1 forbids downloading it",
                f"download it once where the hub is reachable (`hf download {model}{' --revision ' + revision if revision else ''}`, "
                "same HF_HOME), unset HF_HUB_OFFLINE, or pass --model a local folder") from None
    try:
        return snapshot_download(model, revision=revision, cache_dir=cache, allow_patterns=MODEL_FILES)
    except GatedRepoError:
        raise InvalidModel(f"model {model} is gated on the Hugging Face Hub", "accept its licence on the hub and log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise InvalidModel(f"model {model} does not exist on the Hugging Face Hub (or is private)",
                           "check the name, or log in (`hf auth login` or HF_TOKEN) for a private model") from None
    except RevisionNotFoundError:
        raise InvalidModel(f"model {model} has no revision {revision}", "pass --revision an existing branch, tag or commit") from None
    except (HfHubHTTPError, OSError) as exc:
        raise HubUnavailable(f"downloading {model}{at} from the Hugging Face Hub failed ({type(exc).__name__})",
                             "check the network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 and use a cached model") from None
