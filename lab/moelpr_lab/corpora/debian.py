"""Fetch and unpack Debian packages without root.

``apt-get download`` only needs the package lists (``apt-get update`` once, as root) and writes the
``.deb`` into the current directory; ``dpkg-deb -x`` unpacks it without installing it, so neither
root nor the package's dependencies are needed.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)


class CorpusError(RuntimeError):
    """A problem the user can fix (missing tool, missing package lists); printed as one line."""


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CorpusError(f"`{name}` was not found on PATH; {hint}")
    return path


def download_deb(package: str, cache_dir: Path) -> Path:
    """Return the cached ``.deb`` of ``package`` in ``cache_dir``, downloading it if absent.

    A ``.deb`` placed in ``cache_dir`` by hand (name ``{package}_*.deb``) is used as is, which also
    lets a machine without a Debian mirror build the corpora.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]

    apt_get = _require_tool(
        "apt-get",
        f"the corpora come from Debian packages: on a non-Debian system download {package}'s .deb "
        f"from https://packages.debian.org/bookworm/{package} into {cache_dir}",
    )
    logger.info("Downloading Debian package %s", package)
    result = subprocess.run(
        [apt_get, "download", package], cwd=cache_dir, capture_output=True, text=True, check=False
    )
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not cached:
        message = (result.stderr or result.stdout).strip().splitlines()
        detail = message[-1] if message else f"exit status {result.returncode}"
        if "Unable to locate package" in detail or "has no installation candidate" in detail:
            raise CorpusError(
                f"apt cannot find {package} ({detail}); the package lists are probably missing: "
                "run `apt-get update` (as root) and try again"
            )
        raise CorpusError(f"`apt-get download {package}` failed: {detail}")
    return cached[-1]


def extract_deb(deb: Path, target: Path) -> Path:
    """Unpack ``deb`` into ``target`` (skipped when a previous extraction completed)."""
    done_marker = target / ".extracted"
    if done_marker.exists():
        return target
    dpkg_deb = _require_tool(
        "dpkg-deb", "install dpkg (`apt-get install dpkg`), or unpack the .deb with `ar x` + `tar` yourself"
    )
    if target.exists():
        shutil.rmtree(target)  # a half-finished extraction from an interrupted run
    target.mkdir(parents=True)
    logger.info("Unpacking %s", deb.name)
    result = subprocess.run([dpkg_deb, "-x", str(deb), str(target)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CorpusError(f"`dpkg-deb -x {deb}` failed: {result.stderr.strip()}")
    done_marker.touch()
    return target


def fetch_package(package: str, cache_dir: Path) -> Path:
    """Download (if needed) and unpack ``package``; return the root of its unpacked file tree."""
    deb = download_deb(package, cache_dir / "debs")
    return extract_deb(deb, cache_dir / "unpacked" / package)
