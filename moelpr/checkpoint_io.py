"""Checkpoint weights read and written one tensor at a time, so a large model never sits whole in memory.

:class:`CheckpointReader` opens a Hugging Face checkpoint directory (one ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``) and loads tensors by name on demand. :class:`ShardedWriter` writes tensors
into safetensors shards named and indexed as ``save_pretrained`` names them, holding at most one shard in
memory. :func:`staged_directory` makes an output directory appear whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint directory whose weights cannot be read as expected."""


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"1024"`` or an int -> bytes (decimal units, as transformers reads them)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if text.endswith(unit):
            number = text.removesuffix(unit).strip()
            break
    else:
        number, factor = text.removesuffix("B"), 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise CheckpointError(f"cannot read {size!r} as a size (examples: 5GB, 500MB, 1073741824)") from None
    if value <= 0:
        raise CheckpointError(f"a shard size must be positive, got {size!r}")
    return value


class CheckpointReader:
    """The weights of a checkpoint directory, loaded tensor by tensor (safetensors only)."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        index_file = self.model_dir / SAFE_WEIGHTS_INDEX_NAME
        single_file = self.model_dir / SAFE_WEIGHTS_NAME
        self._files = ExitStack()
        if index_file.is_file():
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        elif single_file.is_file():
            with safe_open(single_file, framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SAFE_WEIGHTS_NAME)
        else:
            raise CheckpointError(
                f"{self.model_dir} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}; save the model with "
                "`save_pretrained` (safetensors) first"
            )
        self._weight_map = weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def _handle(self, name: str):
        shard = self._weight_map[name]
        if shard not in self._handles:
            path = self.model_dir / shard
            if not path.is_file():
                raise CheckpointError(f"{path}, listed in {SAFE_WEIGHTS_INDEX_NAME}, is missing")
            self._handles[shard] = self._files.enter_context(safe_open(path, framework="pt"))
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape_and_dtype(self, name: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype name (``"F32"``, ``"BF16"``...) without loading the tensor."""
        tensor_slice = self._handle(name).get_slice(name)
        return list(tensor_slice.get_shape()), tensor_slice.get_dtype()

    def close(self) -> None:
        self._files.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ShardedWriter:
    """Writes tensors, in the order given, into shards of at most ``max_shard_bytes`` (a tensor larger than that
    gets a shard of its own); :meth:`finish` names them as ``save_pretrained`` does and writes the index."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str], int]] = []  # (temporary file name, tensor names, bytes)
        self.largest_shard_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names, _ in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # Tensors must own their memory: safetensors refuses tensors that share storage.
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size

    def _flush(self) -> None:
        temporary = f"shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, self.directory / temporary, metadata={"format": "pt"})
        self._shards.append((temporary, list(self._pending), self._pending_bytes))
        self.largest_shard_bytes = max(self.largest_shard_bytes, self._pending_bytes)
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write what is pending, rename the shards to their final names; returns the weight files."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final_names = [SAFE_WEIGHTS_NAME]
        else:
            final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (temporary, names, _), final in zip(self._shards, final_names):
            (self.directory / temporary).rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {"metadata": {"total_size": sum(size for _, _, size in self._shards)}, "weight_map": weight_map}
            (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [self.directory / name for name in final_names]


@contextmanager
def staged_directory(output_path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``output_path`` to write into, renamed to ``output_path`` when the block succeeds
    and removed when it fails, so a killed or failed run never leaves a half-written checkpoint behind.
    ``output_path`` may exist only as an empty directory."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent))
    # mkdtemp makes the directory private (0700); the checkpoint should get the permissions of any new directory.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if output_path.exists():
            output_path.rmdir()
        staging.rename(output_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
