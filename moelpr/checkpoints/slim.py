"""Slim checkpoints: a directory that holds only the tensors its stage changed, plus a reference to the checkpoint
it was made from (docs/checkpoints.md).

A slim directory is an ordinary checkpoint directory (``config.json``, tokenizer, ``model.safetensors`` or shards)
whose weights are a subset of the model's, with :data:`REFERENCE_NAME` beside them. The reference names the base
checkpoint (a path relative to the slim directory and its real path when written, or a Hub id), says
whether the base is a MoE checkpoint (whole or slim itself: references chain) or the dense model an upcycled
checkpoint was made from, and records a hash of the base's tensors (moelpr.checkpoints.fingerprint). :class:`ComposedCheckpoint` resolves the
chain and gives every tensor of the full model, each read from the newest checkpoint of the chain that holds it;
the tensors of a dense base are named (and copied into every expert) as ``moelpr upcycle`` would write them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .fingerprint import content_fingerprint, sampled_fingerprint
from .streaming import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, CheckpointError, CheckpointReader, TensorSpec

REFERENCE_NAME = "moelpr_reference.json"
# 2: the fingerprint hashes every byte (content_fingerprint); 1: it hashed samples (sampled_fingerprint).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MOE_BASE, DENSE_BASE = "moe", "dense"
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


@dataclass(frozen=True)
class Reference:
    """What a slim checkpoint records about its base (the content of :data:`REFERENCE_NAME`)."""

    base: str  # a path relative to the slim directory, or a Hub id
    base_absolute: str | None  # the base's real path when the slim checkpoint was written
    base_format: str  # MOE_BASE or DENSE_BASE
    fingerprint: str  # format 2: content_fingerprint(); format 1: sampled_fingerprint()
    format_version: int = FORMAT_VERSION
    base_revision: str | None = None  # the commit of a Hub base


# from_pretrained's options that say where and how to fetch a Hub model's files.
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")


def _hub_file(repo_id: str, filename: str, subfolder: str, options: dict[str, Any]) -> Path | None:
    """One file of a Hub model, through transformers' own resolution (cache, offline mode, download), or None."""
    from transformers.utils import cached_file

    try:
        found = cached_file(
            repo_id,
            filename,
            subfolder=subfolder,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **options,
        )
    except (OSError, ValueError):  # not a repo id, unknown repo, no access: no such file here
        return None
    return Path(found) if found else None


def locate_checkpoint(name: str, subfolder: str = "", **options: Any) -> Path | None:
    """The local directory of a checkpoint named by a path or a Hub id (``subfolder`` inside it, ``options`` from
    :data:`HUB_OPTIONS`), with its config and weight files fetched there; None when it is nowhere to be found."""
    local = Path(name, subfolder)
    if local.is_dir():
        return local
    index = _hub_file(name, SAFE_WEIGHTS_INDEX_NAME, subfolder, options)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SlimCheckpointError(f"{index} is not a safetensors index (no weight_map)") from None
        weights = [_hub_file(name, shard, subfolder, options) for shard in shards]
    else:
        weights = [_hub_file(name, SAFE_WEIGHTS_NAME, subfolder, options)]
    if None in weights:
        return None
    for optional in ("config.json", "generation_config.json", REFERENCE_NAME):
        _hub_file(name, optional, subfolder, options)
    return weights[0].parent


def find_slim_checkpoint(name: str | os.PathLike, subfolder: str = "", **options: Any) -> Path | None:
    """The local directory of the slim checkpoint ``name`` (a directory or a Hub id, ``subfolder`` inside it) names,
    its files fetched, or None when it is not a slim checkpoint."""
    local = Path(name, subfolder)
    if local.is_dir():
        return local if is_slim_checkpoint(local) else None
    if _hub_file(str(name), REFERENCE_NAME, subfolder, options) is None:
        return None
    found = locate_checkpoint(str(name), subfolder, **options)
    if found is None:
        raise SlimCheckpointError(f"slim checkpoint {name} ({subfolder or 'top folder'}) lacks its weight files")
    return found


def _recorded_path(base_dir: Path, final_dir: Path) -> tuple[str, str]:
    """``base_dir`` relative to ``final_dir`` and absolute, both through symlinks (what the filesystem resolves)."""
    real_base = os.path.realpath(base_dir)
    return os.path.relpath(real_base, os.path.realpath(final_dir)), real_base


def write_reference(
    directory: str | os.PathLike, base: str | os.PathLike, base_format: str, final_dir: str | os.PathLike | None = None
) -> Reference:
    """Write the reference of the slim checkpoint being written in ``directory`` (which becomes ``final_dir`` when
    it is a staging directory) to its base: a local directory (recorded relative to ``final_dir`` and absolute) or
    a Hub id (with its commit), with the base's :func:`content_fingerprint`."""
    final_dir = Path(final_dir if final_dir is not None else directory)
    revision = None
    if Path(base).is_dir():
        base_dir = Path(base)
        recorded, absolute = _recorded_path(base_dir, final_dir)
    else:
        base_dir = locate_checkpoint(str(base))
        if base_dir is None:
            raise SlimCheckpointError(f"the base checkpoint {base} is neither a directory nor a Hub model here")
        from transformers.utils.hub import extract_commit_hash

        # A Hub model's files lie in .../snapshots/<commit>/, which names the commit they are from.
        recorded, absolute, revision = str(base), None, extract_commit_hash(str(base_dir / "config.json"), None)
    reference = Reference(recorded, absolute, base_format, content_fingerprint(base_dir), base_revision=revision)
    (Path(directory) / REFERENCE_NAME).write_text(json.dumps(asdict(reference), indent=2) + "\n")
    return reference


def read_reference(slim_dir: str | os.PathLike) -> Reference:
    path = Path(slim_dir) / REFERENCE_NAME
    try:
        fields = json.loads(path.read_text())
        reference = Reference(**fields)
    except (ValueError, TypeError):
        raise SlimCheckpointError(f"{path} is not a moelpr reference file") from None
    if reference.format_version not in READABLE_VERSIONS or reference.base_format not in (MOE_BASE, DENSE_BASE):
        raise SlimCheckpointError(f"{path} has a format this moelpr does not read (version {reference.format_version})")
    return reference


def _matches(base_dir: Path | None, reference: Reference) -> str | None:
    """None when ``base_dir`` holds the tensors ``reference`` recorded, else why not."""
    if base_dir is None:
        return "not found"
    if not base_dir.is_dir():
        return "which is missing"
    check = content_fingerprint if reference.format_version >= 2 else sampled_fingerprint
    try:
        found = check(base_dir)
    except CheckpointError as error:
        return f"unreadable: {error}"
    return None if found == reference.fingerprint else "whose tensors changed since it was written"


def _candidates(
    slim_dir: Path, reference: Reference, options: dict[str, Any]
) -> list[tuple[str, Callable[[], Path | None]]]:
    """Where the base may be, in the order tried, each as its name and a way to get its local directory: the
    relative path as the filesystem resolves it (through symlinks), then joined lexically (as a shell's `cd`),
    then the recorded absolute path, then the Hub id."""
    found: list[tuple[str, Callable[[], Path | None]]] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            found.append((str(path), lambda: path))

    if not Path(reference.base).is_absolute():
        add(Path(os.path.realpath(slim_dir / reference.base)))
        add(Path(os.path.normpath(slim_dir.absolute() / reference.base)))
    if reference.base_absolute:
        add(Path(reference.base_absolute))
    if reference.base.count("/") == 1 and not reference.base.startswith((".", "/")):
        hub_options = {**{k: v for k, v in options.items() if k != "revision"}, "revision": reference.base_revision}
        name = f"Hub model {reference.base}" + (f"@{reference.base_revision[:12]}" if reference.base_revision else "")
        found.append((name, lambda: locate_checkpoint(reference.base, **hub_options)))
    return found


def resolve_base(slim_dir: str | os.PathLike, reference: Reference | None = None, **options: Any) -> Path:
    """The base directory of a slim checkpoint: the first candidate (:func:`_candidates`) that holds the tensors
    the reference recorded. None matching is refused in one line that names every candidate and what was wrong.
    ``options`` (:data:`HUB_OPTIONS` but the revision) reach a Hub base."""
    slim_dir = Path(slim_dir)
    reference = reference or read_reference(slim_dir)
    tried = []
    for name, get_dir in _candidates(slim_dir, reference, options):
        base_dir = get_dir()
        problem = _matches(base_dir, reference)
        if problem is None:
            return base_dir
        tried.append(f"{name}, {problem}")
    raise SlimCheckpointError(
        f"slim checkpoint {slim_dir} refers to {' or '.join(tried)}; it loads only with the base it was trained "
        f"from: restore that, or load it where its base is and write a whole checkpoint with "
        f"`moelpr merge --model_path {slim_dir} --output_path <dir>`"
    )


def is_base_of(slim_dir: str | os.PathLike, name_or_path: str | os.PathLike, **options: Any) -> bool:
    """Whether ``name_or_path`` (a directory or a Hub id) is the checkpoint a slim checkpoint was made from."""
    base = resolve_base(slim_dir, **options)
    named = locate_checkpoint(str(name_or_path), **{k: v for k, v in options.items() if k != "revision"})
    return named is not None and os.path.realpath(named) == os.path.realpath(base)


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

    def __init__(self, model_dir: str | os.PathLike, **hub_options: Any) -> None:
        """``hub_options`` (:data:`HUB_OPTIONS`) reach the bases named by Hub ids."""
        self.model_dir = Path(model_dir)
        self._hub_options = hub_options
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
        base_dir = resolve_base(model_dir, reference, **self._hub_options)
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
