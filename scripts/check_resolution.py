"""Installing moelpr into a LLaMA-Factory environment changes none of LLaMA-Factory's packages.

In an empty virtual environment, pip resolves (``pip install --dry-run --report``) ``llamafactory==0.9.5`` alone and
``llamafactory==0.9.5`` together with this project, from the package index as a user's pip would, and every package
the first resolves must come out at the same version in the second (moelpr may add packages of its own). Run by
.ci/run before the tests; exits 1, naming each package that differs, when a range in pyproject.toml moves one.

    python scripts/check_resolution.py [PROJECT_SPEC]    # default ".", e.g. ".[all]" to include the extras
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LLAMAFACTORY = "llamafactory==0.9.5"


def start_resolving(pip: Path, requirements: list[str], report: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(pip), "install", "--dry-run", "--quiet", "--report", str(report), *requirements],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def resolved(report: Path) -> dict[str, str]:
    """Package name -> version of what the report would install."""
    install = json.loads(report.read_text())["install"]
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in install}


def main(argv: list[str]) -> int:
    project = argv[0] if argv else "."
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moelpr-resolution.") as tmp:
        env_dir = Path(tmp) / "venv"
        venv.create(env_dir, with_pip=True)
        pip = env_dir / "bin" / "pip"
        reports = {"alone": Path(tmp) / "alone.json", "with moelpr": Path(tmp) / "with-moelpr.json"}
        # Both at once: each spends most of its time waiting for the index.
        runs = {
            "alone": start_resolving(pip, [LLAMAFACTORY], reports["alone"]),
            "with moelpr": start_resolving(pip, [LLAMAFACTORY, project], reports["with moelpr"]),
        }
        for name, run in runs.items():
            _, stderr = run.communicate()
            if run.returncode != 0:
                errors = [line for line in stderr.splitlines() if "is ignored: it is neither" not in line]
                print(f"check_resolution: pip could not resolve {name}:\n" + "\n".join(errors[-20:]), file=sys.stderr)
                return 2
        alone, together = resolved(reports["alone"]), resolved(reports["with moelpr"])
    seconds = time.monotonic() - start

    moved = {name: (version, together.get(name)) for name, version in alone.items() if together.get(name) != version}
    added = sorted(f"{name} {together[name]}" for name in together.keys() - alone.keys())
    for name, (version, other) in sorted(moved.items()):
        print(
            f"check_resolution: {name}: {version} with {LLAMAFACTORY} alone, {other or 'absent'} with {project}",
            file=sys.stderr,
        )
    if moved:
        print(
            f"check_resolution: {len(moved)} of {len(alone)} packages differ; fix the ranges in pyproject.toml",
            file=sys.stderr,
        )
        return 1
    print(
        f"check_resolution: {len(alone)} packages of {LLAMAFACTORY} resolve alike with {project} "
        f"(torch {alone.get('torch')}, transformers {alone.get('transformers')}); {project} adds "
        f"{', '.join(added)}; {seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
