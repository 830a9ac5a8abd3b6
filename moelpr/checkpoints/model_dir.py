"""The check that a path names a model directory, made once for every command that reads one."""

from __future__ import annotations

import os
from pathlib import Path

from .streaming import CheckpointError

CONFIG_NAME = "config.json"


def require_model_dir(path: str | os.PathLike, option: str = "--model_path") -> Path:
    """``path`` as a :class:`~pathlib.Path` when it holds a ``config.json``; else a :class:`CheckpointError` that
    names the ``option`` it was given with."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{option} {path} is not a model directory (no {CONFIG_NAME} there)")
    return path
