"""What a slim checkpoint records of its base's weights, so that it loads with exactly those or not at all
(docs/checkpoints.md).

:func:`content_fingerprint` hashes every byte of every tensor with its name, dtype and shape, in name order, so it
is the same for any sharding or file layout of the same tensors and differs for any changed value. Hashing an 8B
model's weights reads tens of GB, so each weight file's tensor digests are cached, keyed by the file's real path,
size, mtime, ctime and inode: the cache trusts that a file whose key is unchanged holds the bytes it held.
:func:`sampled_fingerprint` is the check of references written before (format 1), which hashed samples only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .streaming import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, CheckpointError, CheckpointReader

CONTENT_PREFIX = "sha256-content:"
# sha256: hardware-accelerated (SHA-NI on x86, the crypto extensions on ARM), it out-runs blake2b there (measured
# in docs/checkpoints.md); hashlib releases the GIL on large updates, so threads hash tensors side by side.
_HASH = "sha256"
_READ_BYTES = 16 << 20
_HASH_THREADS = min(8, os.cpu_count() or 1)
# A file modified this recently may change again within its timestamp's granularity with an unchanged key:
# its digests are not cached (git's "racily clean" rule).
_RACY_NS = 2_000_000_000
CACHE_ENV = "MOELPR_FINGERPRINT_CACHE"
# Format 1 hashed these many bytes from the start, middle and end of every tensor's data.
_SAMPLE_BYTES = 4096

_memory_cache: dict[str, dict[str, str]] = {}


def _cache_dir() -> Path | None:
    """Where digests are cached: $MOELPR_FINGERPRINT_CACHE (``off`` for nowhere), else moelpr/fingerprints under
    $XDG_CACHE_HOME or ~/.cache."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.lower() in ("", "0", "off", "none") else Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moelpr" / "fingerprints"


def _file_key(path: Path) -> tuple[str, os.stat_result]:
    real = os.path.realpath(path)
    st = os.stat(real)
    key = [real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest(), st


def _read_cached(key: str) -> dict[str, str]:
    if key in _memory_cache:
        return _memory_cache[key]
    directory = _cache_dir()
    try:
        found = json.loads((directory / f"{key}.json").read_text()) if directory is not None else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) and all(isinstance(v, str) for v in found.values()) else {}


def _write_cached(key: str, digests: dict[str, str]) -> None:
    _memory_cache[key] = digests
    directory = _cache_dir()
    if directory is None:
        return
    try:  # a cache that cannot be written costs time, never correctness
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
            json.dump(digests, handle)
        os.replace(handle.name, directory / f"{key}.json")
    except OSError:
        pass


def _hash_range(path: Path, offset: int, length: int) -> str:
    digest = hashlib.new(_HASH)
    buffer = bytearray(min(_READ_BYTES, max(length, 1)))
    fd = os.open(path, os.O_RDONLY)
    try:
        while length:
            count = os.preadv(fd, [memoryview(buffer)[: min(length, len(buffer))]], offset)
            if not count:
                raise CheckpointError(f"{path} is truncated")
            digest.update(memoryview(buffer)[:count])
            offset, length = offset + count, length - count
    finally:
        os.close(fd)
    return digest.hexdigest()


def _file_digests(path: Path, tensors: Iterable[tuple[str, int, int]], pool: ThreadPoolExecutor) -> dict[str, str]:
    """The digest of each tensor's bytes (name, offset, length) in one weight file, from the cache when its key
    is unchanged."""
    tensors = list(tensors)
    key, before = _file_key(path)
    cached = _read_cached(key)
    missing = [t for t in tensors if t[0] not in cached]
    if not missing:
        return cached
    digests = dict(zip([name for name, _, _ in missing], pool.map(lambda t: _hash_range(path, t[1], t[2]), missing)))
    digests = {**cached, **digests}
    after_key, _ = _file_key(path)
    if after_key == key and time.time_ns() - before.st_mtime_ns > _RACY_NS:
        _write_cached(key, digests)
    return digests


def content_fingerprint(model_dir: str | os.PathLike) -> str:
    """A hash of every tensor of a checkpoint directory: its name, dtype, shape and every byte of its data."""
    with CheckpointReader(model_dir) as reader:
        by_file: dict[Path, list[tuple[str, int, int]]] = {}
        for name in reader.names():
            path, offset, length = reader.data_location(name)
            by_file.setdefault(path, []).append((name, offset, length))
        digests: dict[str, str] = {}
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            for path, tensors in by_file.items():
                digests.update(_file_digests(path, tensors, pool))
        digest = hashlib.new(_HASH)
        for name in sorted(digests):
            spec = reader.spec(name)
            digest.update(json.dumps([name, str(spec.dtype), list(spec.shape), digests[name]]).encode() + b"\n")
    return CONTENT_PREFIX + digest.hexdigest()


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


def sampled_fingerprint(model_dir: str | os.PathLike) -> str:
    """Format 1's fingerprint, kept to check the references it wrote by their own rule: every shard's header and
    three 4 KiB samples (start, middle, end) of every tensor's data."""
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
                    size = min(_SAMPLE_BYTES, end - start)
                    for at in sorted({start, (start + end - size) // 2, end - size}):
                        handle.seek(8 + length + at)
                        digest.update(handle.read(size))
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        except (struct.error, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    return "sha256:" + digest.hexdigest()
