"""The check that a path names a model directory, made once for every command that reads one: a local directory,
or a Hugging Face Hub id resolved through huggingface_hub's cache as LLaMA-Factory's ``model_name_or_path`` is."""

from __future__ import annotations

import os
from pathlib import Path

from .streaming import CheckpointError

CONFIG_NAME = "config.json"
# Files of a Hub repository that no command reads (other frameworks' weights, llama.cpp's and the original
# releases' checkpoints): not downloaded.
HUB_IGNORE_PATTERNS = ("*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "*.h5", "*.msgpack", "*.ot", "original/*", "*.pth")


def require_model_dir(path: str | os.PathLike, option: str = "--model_path") -> Path:
    """The local directory holding the model ``path`` names, with its ``config.json``: ``path`` itself where it
    exists or is no Hub repo id, else the repo's snapshot in huggingface_hub's cache (downloaded when online; the
    cache alone with ``HF_HUB_OFFLINE=1``). A :class:`CheckpointError` that names the ``option`` it was given with
    otherwise."""
    local = Path(path)
    if not local.exists() and _is_repo_id(str(path)):
        local = _hub_snapshot(str(path), option)
        if not (local / CONFIG_NAME).is_file():
            raise CheckpointError(f"{option} {path}: the Hub repository holds no {CONFIG_NAME}; it is not a model")
    elif not (local / CONFIG_NAME).is_file():
        raise CheckpointError(f"{option} {path} is not a model directory (no {CONFIG_NAME} there)")
    return local


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_snapshot(repo_id: str, option: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, ignore_patterns=list(HUB_IGNORE_PATTERNS)))
    except GatedRepoError:
        reason = "the repository is gated: accept its terms on huggingface.co, then log in (`hf auth login`)"
    except RepositoryNotFoundError:
        reason = "no such model repository on the Hub (or a private one: log in with `hf auth login`)"
    except LocalEntryNotFoundError:
        where = constants.HF_HUB_CACHE
        reason = f"not in the Hugging Face cache ({where}) and the Hub is out of reach (offline, or HF_HUB_OFFLINE=1)"
    except OSError as error:  # the Hub's other HTTP errors, a full disk
        reason = " ".join(str(error).split()) or type(error).__name__
    raise CheckpointError(
        f"{option} {repo_id} is neither a local directory nor a model on the Hugging Face Hub: {reason}"
    )
