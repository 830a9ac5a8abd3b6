"""Checkpoint weights read and written one tensor at a time, so a large model never sits whole in memory.

:class:`CheckpointReader` opens a Hugging Face checkpoint directory (one ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``) and loads tensors by name on demand. :class:`ShardedWriter` writes a
checkpoint whose tensors (names, shapes, dtypes, order) are known in advance straight to its safetensors shards,
named and indexed as ``save_pretrained`` names them: since every shard's header can be written before its data,
no tensor has to wait in memory for the rest of its shard. :func:`staged_directory` makes an output directory
appear whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from ..errors import MoELPRUserError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DEFAULT_MAX_SHARD_SIZE = "5GB"

# safetensors' dtype names (https://github.com/huggingface/safetensors, format description).
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class CheckpointError(MoELPRUserError, ValueError):
    """A checkpoint directory whose weights cannot be read as expected."""


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1024"`` or an int -> bytes (GB/MB/KB decimal, as transformers'
    ``max_shard_size`` reads them; GiB/MiB/KiB binary)."""
    if isinstance(size, int):
        value = size
    else:
        text = size.strip().upper()
        units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
        for unit, factor in units:
            if text.endswith(unit):
                number = text.removesuffix(unit).strip()
                break
        else:
            number, factor = text.removesuffix("B").strip(), 1
        try:
            value = int(float(number) * factor)
        except ValueError:
            raise CheckpointError(f"cannot read {size!r} as a size (examples: 5GB, 500MB, 1073741824)") from None
    if value <= 0:
        raise CheckpointError(f"a shard size must be positive, got {size!r}")
    return value


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a safetensors file's header (``dtype``, ``shape``, ``data_offsets``) and the file
    offset its data starts at, without reading the data."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        sizes_agree = all(
            entry["data_offsets"][1] - entry["data_offsets"][0]
            == prod(entry["shape"]) * _DTYPES_BY_NAME[entry["dtype"]].itemsize
            for entry in header.values()
        )
    except (struct.error, ValueError, UnicodeDecodeError, MemoryError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path} is not a safetensors file this reader knows (unreadable header)") from None
    if not sizes_agree:
        raise CheckpointError(f"{path} is not a valid safetensors file (a tensor's size disagrees with its shape)")
    return header, 8 + length


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor that is to be written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


class CheckpointReader:
    """The weights of a checkpoint directory, loaded tensor by tensor (safetensors only).

    Every shard's header is read when the reader opens, so a missing shard or an unreadable file is reported
    before anything else happens. :meth:`names` lists the tensors in the order they are stored in.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        index_file = self.model_dir / SAFE_WEIGHTS_INDEX_NAME
        if index_file.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index_file} is not a safetensors index (no weight_map)") from None
            shard_names = sorted(set(weight_map.values()))
        elif (self.model_dir / SAFE_WEIGHTS_NAME).is_file():
            weight_map, shard_names = {}, [SAFE_WEIGHTS_NAME]
        elif any((self.model_dir / name).is_file() for name in PYTORCH_WEIGHTS_NAMES):
            raise CheckpointError(
                f"{self.model_dir} holds PyTorch .bin weights; only safetensors checkpoints are read one tensor at "
                "a time. Convert it first: load it with from_pretrained and save_pretrained it (safetensors is the "
                "default)"
            )
        else:
            raise CheckpointError(f"{self.model_dir} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")

        self._entries: dict[str, tuple[str, int, TensorSpec]] = {}  # name -> (shard, file offset, spec)
        for shard in shard_names:
            path = self.model_dir / shard
            if not path.is_file():
                raise CheckpointError(f"{path}, listed in {SAFE_WEIGHTS_INDEX_NAME}, is missing")
            header, data_start = read_safetensors_header(path)
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                if not weight_map or weight_map.get(name) == shard:
                    spec = TensorSpec(name, tuple(entry["shape"]), _DTYPES_BY_NAME[entry["dtype"]])
                    self._entries[name] = (shard, data_start + entry["data_offsets"][0], spec)
        absent = [name for name in weight_map if name not in self._entries]
        if absent:
            raise CheckpointError(
                f"{absent[0]} (and {len(absent) - 1} more) listed in {SAFE_WEIGHTS_INDEX_NAME} is not in its shard"
            )
        self._files = ExitStack()
        self._handles: dict[str, BinaryIO] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of a tensor, from the header alone."""
        return self._entries[name][2]

    def file_of(self, name: str) -> Path:
        """The shard file that holds a tensor."""
        return self.model_dir / self._entries[name][0]

    def data_location(self, name: str) -> tuple[Path, int, int]:
        """Where a tensor's raw bytes lie: its shard file, the offset of its data in it, and their length."""
        shard, offset, spec = self._entries[name]
        return self.model_dir / shard, offset, spec.nbytes

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read into memory of its own with plain reads: a memory map (``safe_open``) would keep every
        page it read resident, and counted in the process's RSS, until the file is closed."""
        shard, offset, spec = self._entries[name]
        if shard not in self._handles:
            self._handles[shard] = self._files.enter_context((self.model_dir / shard).open("rb", buffering=0))
        handle = self._handles[shard]
        data = torch.empty(spec.nbytes, dtype=torch.uint8)
        handle.seek(offset)
        view = memoryview(data.numpy())
        while view:
            count = handle.readinto(view)
            if not count:
                raise CheckpointError(f"{self.model_dir / shard} is truncated (in the data of {name})")
            view = view[count:]
        return data.view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        self._files.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def plan_shards(layout: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive runs of ``layout`` of at most ``max_shard_bytes`` each, split where ``save_pretrained`` splits;
    a larger tensor gets a shard of its own where it stands (``save_pretrained`` moves it ahead of the open shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in layout:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _safetensors_header(specs: Sequence[TensorSpec]) -> bytes:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned, as safetensors itself does
    return struct.pack("<Q", len(encoded)) + encoded


class ShardedWriter:
    """Writes the tensors of ``layout``, in its order, into safetensors shards of at most ``max_shard_bytes``.

    Each tensor goes to disk when :meth:`write` gets it; only an open file is kept. One shard is named
    ``model.safetensors``; several are named ``model-0000i-of-0000n.safetensors`` and listed in
    ``model.safetensors.index.json``, as ``save_pretrained`` does. Tensors may share memory (they are written as
    separate copies). Little-endian hosts only, like safetensors' own writer.
    """

    def __init__(self, directory: str | os.PathLike, layout: Sequence[TensorSpec], max_shard_bytes: int) -> None:
        names = [spec.name for spec in layout]
        if len(set(names)) != len(names):
            raise ValueError("a tensor name appears twice in the layout")
        unknown = {spec.dtype for spec in layout} - set(_DTYPE_NAMES)
        if unknown:
            raise ValueError(f"safetensors cannot store dtype {unknown.pop()}")
        self.directory = Path(directory)
        self.shards = plan_shards(layout, max_shard_bytes)
        count = len(self.shards)
        self.file_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        if count == 1:
            self.file_names = [SAFE_WEIGHTS_NAME]
        self.largest_shard_bytes = max(sum(spec.nbytes for spec in shard) for shard in self.shards)
        self.total_bytes = sum(spec.nbytes for spec in layout)
        self._pending = [(shard_idx, spec) for shard_idx, shard in enumerate(self.shards) for spec in shard][::-1]
        self._file: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the layout; its name, shape and dtype must be the layout's."""
        if not self._pending:
            raise ValueError(f"{name}: every tensor of the layout is already written")
        shard_idx, spec = self._pending.pop()
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise ValueError(
                f"expected {spec.name} {list(spec.shape)} {spec.dtype}, got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        if self._file is None:
            self._file = (self.directory / self.file_names[shard_idx]).open("wb")
            self._file.write(_safetensors_header(self.shards[shard_idx]))
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        if not self._pending or self._pending[-1][0] != shard_idx:
            self._file.close()
            self._file = None

    def finish(self) -> list[Path]:
        """Check that every tensor was written and write the index of a sharded checkpoint; returns the shards."""
        if self._pending:
            first = self._pending[-1][1].name
            raise ValueError(f"{len(self._pending)} tensors of the layout were never written, from {first}")
        if len(self.shards) > 1:
            weight_map = {spec.name: file for shard, file in zip(self.shards, self.file_names) for spec in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [self.directory / name for name in self.file_names]

    def close(self) -> None:
        """Close the open shard, if any (after a failure; :meth:`finish` needs no close)."""
        if self._file is not None:
            self._file.close()
            self._file = None


TensorSource = Callable[[Callable[[str], torch.Tensor]], Iterable[tuple[str, torch.Tensor]]]


def write_derived_tensors(
    directory: str | os.PathLike, reader: CheckpointReader, derive: TensorSource, max_shard_bytes: int, desc: str
) -> list[Path]:
    """Write the tensors ``derive(get)`` yields from a checkpoint's tensors (``get(name)``) into shards.

    ``derive`` runs twice: first on meta tensors (shapes and dtypes from the headers, nothing read or
    allocated) to plan the shards, then on the real tensors, each written as soon as it is yielded.
    """
    layout = [
        TensorSpec(name, tuple(tensor.shape), tensor.dtype)
        for name, tensor in derive(
            lambda name: torch.empty(reader.spec(name).shape, dtype=reader.spec(name).dtype, device="meta")
        )
    ]
    writer = ShardedWriter(directory, layout, max_shard_bytes)
    try:
        for name, tensor in tqdm(derive(reader.get), total=len(layout), desc=desc, unit="tensor", disable=None):
            writer.write(name, tensor)
    finally:
        writer.close()
    return writer.finish()


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
