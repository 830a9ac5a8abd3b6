"""Slim checkpoints: a directory that holds only the tensors its stage changed, plus a reference to the checkpoint
it was made from (docs/checkpoints.md).

A slim directory is an ordinary checkpoint directory (``config.json``, tokenizer, ``model.safetensors`` or shards)
whose weights are a subset of the model's, with :data:`REFERENCE_NAME` beside them. The reference names the base
checkpoint (a path relative to the slim directory, the absolute path it had when written, or a Hub id), says
whether the base is a MoE checkpoint (whole or slim itself: references chain) or the dense model an upcycled
checkpoint was made from, and records the base's :func:`fingerprint`. :class:`ComposedCheckpoint` resolves the
chain and gives every tensor of the full model, each read from the newest checkpoint of the chain that holds it;
the tensors of a dense base are named (and copied into every expert) as ``moelpr upcycle`` would write them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .streaming import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, CheckpointError, CheckpointReader, TensorSpec

REFERENCE_NAME = "moelpr_reference.json"
FORMAT_VERSION = 1
MOE_BASE, DENSE_BASE = "moe", "dense"
# Bytes hashed from the start, the middle and the end of every tensor's data by fingerprint().
FINGERPRINT_SAMPLE_BYTES = 4096
MAX_CHAIN_LENGTH = 64

# Where the tensors of a model upcycled from a dense checkpoint come from, which only the upcycler knows (this layer
# knows no model family): given the dense checkpoint and the slim directory (its config.json), every tensor name of
# the upcycled model, in its order, mapped to the dense tensor it copies, or to None for a tensor the upcycler makes
# anew (which the slim checkpoint holds). It raises SlimCheckpointError when the dense checkpoint does not fit.
DenseBaseLayout = Callable[[CheckpointReader, Path], dict[str, str | None]]
_dense_base_layout: DenseBaseLayout | None = None


def register_dense_base_layout(layout: DenseBaseLayout) -> None:
    """Make ``layout`` the one :class:`ComposedCheckpoint` uses for dense bases (``import moelpr`` registers the
    upcycler's, moelpr.upcycling.slim_base)."""
    global _dense_base_layout
    _dense_base_layout = layout


class SlimCheckpointError(CheckpointError):
    """A slim checkpoint whose base cannot be used (missing, changed, or not what the reference says)."""


def is_slim_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / REFERENCE_NAME).is_file()


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            return [model_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map)") from None
    if (model_dir / SAFE_WEIGHTS_NAME).is_file():
        return [model_dir / SAFE_WEIGHTS_NAME]
    raise CheckpointError(f"{model_dir} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")


def fingerprint(model_dir: str | os.PathLike) -> str:
    """A hash of a checkpoint's weights that is cheap to compute whatever the model's size: every shard's header
    (tensor names, dtypes, shapes, offsets) and three samples of :data:`FINGERPRINT_SAMPLE_BYTES` from the start,
    middle and end of every tensor's data (about 12 KiB a tensor, some 12 MB for a 25B-parameter MoE).

    It changes when a shard is replaced, when a tensor is added, removed, renamed, reshaped or retyped, and when
    training or any edit changes a tensor's first, middle or last bytes (training changes nearly every element);
    an edit confined to the unsampled bytes of a tensor goes unnoticed.
    """
    digest = hashlib.sha256()
    for path in _weight_files(Path(model_dir)):
        try:
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header_bytes = handle.read(length)
                entries = json.loads(header_bytes)
                entries.pop("__metadata__", None)
                digest.update(path.name.encode() + b"\0" + header_bytes)
                for name in sorted(entries):
                    start, end = entries[name]["data_offsets"]
                    size = min(FINGERPRINT_SAMPLE_BYTES, end - start)
                    for at in sorted({start, (start + end - size) // 2, end - size}):
                        handle.seek(8 + length + at)
                        digest.update(handle.read(size))
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        except (struct.error, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class Reference:
    """What a slim checkpoint records about its base (the content of :data:`REFERENCE_NAME`)."""

    base: str  # a path relative to the slim directory, or a Hub id
    base_absolute: str | None  # the base's absolute path when the slim checkpoint was written
    base_format: str  # MOE_BASE or DENSE_BASE
    fingerprint: str
    format_version: int = FORMAT_VERSION


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a Hub model (downloaded if the Hub is reachable), or None when there is none."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # noqa: BLE001 - offline, unknown repo, no access: all mean "not found" here
        return None


def write_reference(
    directory: str | os.PathLike, base: str | os.PathLike, base_format: str, final_dir: str | os.PathLike | None = None
) -> Reference:
    """Write the reference of the slim checkpoint being written in ``directory`` (which becomes ``final_dir`` when
    it is a staging directory) to its base: a local directory (recorded relative to ``final_dir`` and absolute) or
    a Hub id."""
    final_dir = Path(final_dir if final_dir is not None else directory).absolute()
    local = Path(base)
    if local.is_dir():
        base_dir = local.absolute()
        recorded, absolute = os.path.relpath(base_dir, final_dir), str(base_dir)
    else:
        base_dir = _hub_snapshot(str(base))
        if base_dir is None:
            raise SlimCheckpointError(f"the base checkpoint {base} is neither a directory nor a Hub model here")
        recorded, absolute = str(base), None
    reference = Reference(recorded, absolute, base_format, fingerprint(base_dir))
    (Path(directory) / REFERENCE_NAME).write_text(json.dumps(asdict(reference), indent=2) + "\n")
    return reference


def read_reference(slim_dir: str | os.PathLike) -> Reference:
    path = Path(slim_dir) / REFERENCE_NAME
    try:
        fields = json.loads(path.read_text())
        reference = Reference(**fields)
    except (ValueError, TypeError):
        raise SlimCheckpointError(f"{path} is not a moelpr reference file") from None
    if reference.format_version != FORMAT_VERSION or reference.base_format not in (MOE_BASE, DENSE_BASE):
        raise SlimCheckpointError(f"{path} has a format this moelpr does not read (version {reference.format_version})")
    return reference


def resolve_base(slim_dir: str | os.PathLike, reference: Reference | None = None) -> Path:
    """The base directory of a slim checkpoint, checked against the recorded fingerprint: the relative path first
    (outputs moved together), then the absolute one, then a Hub id. One-line errors name the path."""
    slim_dir = Path(slim_dir)
    reference = reference or read_reference(slim_dir)
    candidates = [] if Path(reference.base).is_absolute() else [Path(os.path.normpath(slim_dir / reference.base))]
    candidates += [Path(reference.base_absolute)] if reference.base_absolute else []
    base_dir = next((path for path in candidates if path.is_dir()), None) or _hub_snapshot(reference.base)
    if base_dir is None:
        tried = " or ".join(str(path) for path in candidates) or reference.base
        raise SlimCheckpointError(
            f"slim checkpoint {slim_dir} refers to {tried}, which is missing; move the stage outputs together or "
            f"restore it (or write whole checkpoints with `moelpr merge`)"
        )
    try:
        found = fingerprint(base_dir)
    except CheckpointError as error:
        raise SlimCheckpointError(f"slim checkpoint {slim_dir} refers to {base_dir}, unreadable: {error}") from None
    if found != reference.fingerprint:
        raise SlimCheckpointError(
            f"slim checkpoint {slim_dir} refers to {base_dir}, whose tensors changed since it was written "
            f"(fingerprint {found[:19]}... is not the recorded {reference.fingerprint[:19]}...)"
        )
    return base_dir


class _CopyOnRead:
    """A safetensors slice whose reads are copies."""

    def __init__(self, tensor_slice: Any) -> None:
        self._slice = tensor_slice

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._slice[index].clone()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._slice, name)


@dataclass(frozen=True)
class _Source:
    reader: CheckpointReader
    key: str


class ComposedCheckpoint:
    """Every tensor of a checkpoint directory, whole or slim, with :class:`CheckpointReader`'s interface
    (``names``, ``spec``, ``get``); a slim chain is resolved and checked when it opens, before anything is read.

    Names come in the order of the chain's root (the dense checkpoint's order, with each upcycled block where its
    FFN was, as ``moelpr upcycle`` writes them); a slim level replaces the tensors it holds.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.model_dir = Path(model_dir)
        self._readers = ExitStack()
        try:
            self._sources = self._compose(self.model_dir, [])
        except BaseException:
            self.close()
            raise

    def _open(self, model_dir: Path) -> CheckpointReader:
        return self._readers.enter_context(CheckpointReader(model_dir))

    def _compose(self, model_dir: Path, chain: list[Path]) -> dict[str, _Source]:
        own = self._open(model_dir)
        own_sources = {name: _Source(own, name) for name in own.names()}
        if not is_slim_checkpoint(model_dir):
            return own_sources
        if len(chain) >= MAX_CHAIN_LENGTH or any(model_dir.resolve() == seen.resolve() for seen in chain):
            raise SlimCheckpointError(f"slim checkpoint {model_dir} refers back to itself through its chain of bases")
        reference = read_reference(model_dir)
        base_dir = resolve_base(model_dir, reference)
        if reference.base_format == DENSE_BASE:
            sources = self._upcycled_sources(base_dir, model_dir, own_sources)
        else:
            sources = self._compose(base_dir, [*chain, model_dir])
        foreign = [name for name in own_sources if name not in sources]
        if foreign:
            raise SlimCheckpointError(
                f"slim checkpoint {model_dir} holds {foreign[0]}, which its base {base_dir} does not have"
            )
        sources.update(own_sources)
        return sources

    def _upcycled_sources(self, dense_dir: Path, slim_dir: Path, own: dict[str, _Source]) -> dict[str, _Source]:
        """The upcycled model's tensors in the order :data:`DenseBaseLayout` gives them: copies of the dense
        tensors, and what the upcycler makes anew (routers...) from ``slim_dir``."""
        if _dense_base_layout is None:
            raise RuntimeError("no dense-base layout is registered; import moelpr to register the upcycler's")
        dense = self._open(dense_dir)
        sources: dict[str, _Source] = {}
        for name, dense_name in _dense_base_layout(dense, slim_dir).items():
            if dense_name is not None:
                sources[name] = _Source(dense, dense_name)
            elif name in own:
                sources[name] = own[name]
            else:
                raise SlimCheckpointError(f"slim upcycled checkpoint {slim_dir} lacks {name}")
        return sources

    def names(self) -> list[str]:
        return list(self._sources)

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def spec(self, name: str) -> TensorSpec:
        source = self._sources[name]
        return TensorSpec(name, source.reader.spec(source.key).shape, source.reader.spec(source.key).dtype)

    def get(self, name: str) -> torch.Tensor:
        source = self._sources[name]
        return source.reader.get(source.key)

    def lazy_state_dict(self, files: ExitStack) -> dict[str, Any]:
        """Every tensor as a safetensors slice (read when the loader indexes it), for ``from_pretrained``'s
        ``state_dict``; the files stay open until ``files`` closes. Expert copies share their FFN's slice."""
        from safetensors import safe_open

        handles: dict[Path, Any] = {}
        state_dict = {}
        read: set[tuple[Path, str]] = set()
        for name, source in self._sources.items():
            path = source.reader.file_of(source.key)
            if path not in handles:
                handles[path] = files.enter_context(safe_open(path, framework="pt", device="cpu"))
            value = handles[path].get_slice(source.key)
            # Reading one slice twice gives the same memory: each copy needs its own, or the experts would alias.
            state_dict[name] = _CopyOnRead(value) if (path, source.key) in read else value
            read.add((path, source.key))
        return state_dict

    def close(self) -> None:
        self._readers.close()

    def __enter__(self) -> ComposedCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
