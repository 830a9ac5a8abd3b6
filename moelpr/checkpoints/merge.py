"""``moelpr merge``: write a slim checkpoint (docs/checkpoints.md) as a standalone whole one, for sharing or
uploading. Streamed like the upcycler: one tensor in memory at a time, whatever the model's size."""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from .slim import REFERENCE_NAME, ComposedCheckpoint
from .streaming import (
    DEFAULT_MAX_SHARD_SIZE,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    CheckpointError,
    ShardedWriter,
    parse_size,
    staged_directory,
)

# Files of the slim directory that describe its weights; the merged checkpoint gets new ones.
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, REFERENCE_NAME)


def merge(model_path: str | Path, output_path: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write every tensor of the (slim) checkpoint at ``model_path`` into ``output_path``, with its config, tokenizer
    and other files; the output appears whole or not at all."""
    model_path, output_path = Path(model_path), Path(output_path)
    if output_path.exists() and (not output_path.is_dir() or any(output_path.iterdir())):
        raise CheckpointError(f"--output_path {output_path} exists and is not empty; choose a new directory")
    max_shard_bytes = parse_size(max_shard_size)
    with ComposedCheckpoint(model_path) as checkpoint, staged_directory(output_path) as staging:
        writer = ShardedWriter(staging, [checkpoint.spec(name) for name in checkpoint.names()], max_shard_bytes)
        try:
            for name in tqdm(checkpoint.names(), desc="merging", unit="tensor", disable=None):
                writer.write(name, checkpoint.get(name))
        finally:
            writer.close()
        writer.finish()
        for item in model_path.iterdir():
            weights = item.name in WEIGHT_FILES or (item.suffix == ".safetensors" and item.name.startswith("model-"))
            if item.is_file() and not weights:
                shutil.copy2(item, staging / item.name)
    return output_path
