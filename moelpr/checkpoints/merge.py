"""``moelpr merge``: write a slim checkpoint (docs/checkpoints.md) as a standalone whole one, for sharing or
uploading. Streamed like the upcycler: one tensor in memory at a time, whatever the model's size."""

from __future__ import annotations

import argparse
import shutil
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a slim moelpr checkpoint as a standalone whole checkpoint.")
    parser.add_argument("--model_path", required=True, help="the slim (or whole) checkpoint directory")
    parser.add_argument("--output_path", required=True, help="new directory for the whole checkpoint")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE, help="largest weight file (default 5GB)")
    args = parser.parse_args(argv)
    try:
        out = merge(args.model_path, args.output_path, args.max_shard_size)
    except CheckpointError as error:
        print(f"moelpr merge: error: {error}", file=sys.stderr)
        return 2
    print(f"Whole checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
