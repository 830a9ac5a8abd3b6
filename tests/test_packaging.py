"""What ``pip install moelpr`` ships: the library and its startup hook, not the lab (lab/moelpr_lab), the tests or
the scripts; and the library neither imports the lab nor runs Debian's package tools, in modules of one concern each."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "moelpr"
# What the startup hook needs at the top of site-packages (see _moelpr_build.py).
STARTUP_HOOK_FILES = {"moelpr-startup.pth", "_moelpr_startup_hook.py"}
# Outputs of earlier builds and runs, and the checkout's own metadata: not sources, so not copied to the build.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", "work", "saves", "cache", ".whl", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
)
LAB_MODULE = re.compile(r"moelpr_lab(\.\w+)*")


def _library_files() -> list[Path]:
    return sorted(path for path in LIBRARY.rglob("*") if path.is_file() and "__pycache__" not in path.parts)


def _library_sources() -> list[Path]:
    return [path for path in _library_files() if path.suffix == ".py"]


def test_wheel_holds_the_library_and_its_startup_hook_only(tmp_path):
    # Built from a copy, so the build's own build/ and egg-info never land in the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    assert (source / "lab" / "moelpr_lab" / "__init__.py").is_file()  # the lab is there to be left out
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), "."]
    result = subprocess.run(command, cwd=source, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = tmp_path.glob("moelpr-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    metadata = {name for name in names if name.split("/")[0].endswith(".dist-info")}
    shipped = names - metadata
    assert STARTUP_HOOK_FILES <= shipped
    library = shipped - STARTUP_HOOK_FILES
    assert {name for name in library if not name.startswith("moelpr/")} == set()
    modules = {name for name in library if name.endswith(".py")}
    assert modules == {path.relative_to(REPO).as_posix() for path in _library_sources()}


def test_the_library_does_not_import_the_lab():
    importers = []
    for path in _library_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                modules = [node.value]  # a module named for importlib, as the CLI's command table does
            else:
                continue
            if any(LAB_MODULE.fullmatch(module) for module in modules):
                importers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert importers == []


def test_the_library_does_not_run_debian_package_tools():
    mentions = [
        f"{path.relative_to(REPO)}:{number}"
        for path in _library_files()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if "apt-get" in line or "dpkg-deb" in line
    ]
    assert mentions == []


def test_no_library_module_is_past_450_lines():
    # The size at which issue 29 split moe.py, export and the CLIs by concern; a module past it holds more than one.
    long_modules = {
        str(path.relative_to(REPO)): lines
        for path in _library_sources()
        if (lines := path.read_text(encoding="utf-8").count("\n")) > 450
    }
    assert long_modules == {}
