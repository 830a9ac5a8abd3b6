"""The package's imports run one way: import-linter keeps pyproject.toml's contracts, and breaks them on an import
that points up a layer."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``moelpr`` package under ``root``, with ``root``'s pyproject.toml."""
    executable = shutil.which("lint-imports")
    assert executable, "lint-imports is not installed (pip install -r requirements.txt)"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [executable, "--no-cache", "--no-logo", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_import_contracts():
    contracts = (REPO / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {contracts} kept, 0 broken." in result.stdout, result.stdout


def test_an_import_up_a_layer_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "moelpr", tmp_path / "moelpr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    streaming = tmp_path / "moelpr" / "checkpoints" / "streaming.py"
    streaming.write_text(streaming.read_text() + "\nimport moelpr.cli  # noqa: E402\n")
    line = streaming.read_text().count("\n")

    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "moelpr.checkpoints is not allowed to import moelpr.cli" in result.stdout, result.stdout
    assert f"moelpr.checkpoints.streaming -> moelpr.cli (l.{line})" in result.stdout, result.stdout
