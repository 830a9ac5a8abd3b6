"""The core of the suite on the stack a user gets, not the lock's.

A user makes an environment with ``pip install llamafactory==0.9.5`` and then installs moelpr into it; pip picks
whatever torch, transformers and the rest resolve to that day (torch 2.14.1 on 2026-12-07, where requirements.txt
pins 2.11.0). This script makes such an environment, an empty virtual environment under the temporary directory,
in those two steps (moelpr from this checkout with the ``eval`` and ``deepspeed`` extras, and pytest with
pytest-xdist), prints what was resolved, and runs the tests of the core there: the models, upcycling, both stages
through ``llamafactory-cli``, slim loading and the transformers export. Run by .ci/run after the main suite; the
environment is deleted at the end. Needs the package index (as scripts/check_resolution.py does); nothing is
written to pip's cache.

    python scripts/user_stack.py [--keep DIR]   # --keep: build the environment in DIR and leave it there
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMAFACTORY = "llamafactory==0.9.5"
# The core: what a user's first day exercises. About 5 minutes on 2 cores (docs/development.md).
CORE_TESTS = [
    "tests/test_model.py",
    "tests/test_upcycling.py",
    "tests/test_plugin_e2e.py",
    "tests/test_slim_checkpoints.py",
    "tests/test_export.py",
]
# As the README's test command runs the suite: two workers, a module each.
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile"]
REPORTED = ["torch", "torchaudio", "transformers", "peft", "trl", "accelerate", "datasets", "llamafactory", "deepspeed"]


def pip_install(python: Path, *requirements: str) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--no-cache-dir", *requirements]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "is ignored: it is neither" not in line]
        sys.exit(f"user_stack: pip install {' '.join(requirements)} failed:\n" + "\n".join(errors[-20:]))


def versions(python: Path) -> str:
    code = (
        "import importlib.metadata as m, sys\n"
        "for name in sys.argv[1:]:\n"
        "    print(f'{name} {m.version(name)}', end='; ')\n"
    )
    return subprocess.run([str(python), "-c", code, *REPORTED], capture_output=True, text=True, check=True).stdout


def run_in(env_dir: Path) -> int:
    python = env_dir / "bin" / "python"
    start = time.monotonic()
    if not python.exists():
        venv.create(env_dir, with_pip=True)
    pip_install(python, LLAMAFACTORY)
    pip_install(python, f"{REPO}[eval,deepspeed]", "pytest", "pytest-xdist")
    print(f"user_stack: installed in {time.monotonic() - start:.0f} s: {versions(python)}", flush=True)
    # The environment's own commands (llamafactory-cli, moelpr, torchrun) first, as after `source bin/activate`.
    env = {**os.environ, "VIRTUAL_ENV": str(env_dir), "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    tests = subprocess.run(
        [str(python), *PYTEST, "--basetemp", str(env_dir / "pytest"), *CORE_TESTS],
        cwd=REPO,
        env=env,
    )
    print(f"user_stack: {'passed' if tests.returncode == 0 else 'FAILED'}, {time.monotonic() - start:.0f} s in all")
    return tests.returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="user_stack", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the environment in this directory and keep it")
    args = parser.parse_args(argv)
    if args.keep:
        return run_in(args.keep.resolve())
    with tempfile.TemporaryDirectory(prefix="moelpr-user-stack.") as tmp:
        return run_in(Path(tmp) / "venv")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
