"""Every command that needs one of moelpr's extras names it in one line, exit non-zero, before anything heavy runs.

Each probe is a fresh interpreter in which the extra's package cannot be imported (``sys.modules[name] = None``,
Python's own way to make ``import name`` fail), running the command's real entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from llamafactory_cli import CLI, REPO

from moelpr.extras import EXTRAS, MissingExtraError, missing_packages, require

MOELPR = "from moelpr.cli import main; sys.exit(main(sys.argv[1:]))"
LLAMAFACTORY_CLI = "from llamafactory.cli import main; sys.argv[0] = 'llamafactory-cli'; main()"


def run_without(module: str, entry_point: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    probe = f"import sys; sys.modules[{module!r}] = None; {entry_point}"
    return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=False, cwd=cwd)


def assert_names_the_extra(run: subprocess.CompletedProcess, package: str, extra: str) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr[-3000:]
    assert f"{package} is not installed" in lines[0] and f"pip install 'moelpr[{extra}]'" in lines[0]
    return lines[0]


def test_require_names_only_the_missing_packages(monkeypatch):
    require("eval", purpose="this test")  # the development install has every extra
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    assert missing_packages("eval") == ["sacrebleu"]
    require("eval", "lm_eval", "matplotlib", purpose="a command that needs no sacrebleu")
    with pytest.raises(MissingExtraError, match=r"^sacrebleu is not installed \(moelpr bench needs the 'eval' extra\)"):
        require("eval", purpose="moelpr bench")


def test_extras_match_pyproject():
    """moelpr.extras checks the packages that pyproject.toml's extras install."""
    import tomllib
    from packaging.requirements import Requirement

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, packages in EXTRAS.items():
        assert {Requirement(requirement).name for requirement in declared[extra]} == set(packages.values())


def test_bench_without_lm_eval(tiny_llama_dir, tmp_path):
    out = tmp_path / "bench"
    run = run_without(
        "lm_eval", MOELPR, "bench", "--model_path", str(tiny_llama_dir), "--output_dir", str(out), cwd=tmp_path
    )
    assert assert_names_the_extra(run, "lm-eval", "eval").startswith("moelpr bench: error: ")
    assert not out.exists()


def test_eval_without_matplotlib(tiny_llama_dir, tmp_path):
    heldout = tmp_path / "en.jsonl"
    heldout.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    out = tmp_path / "eval"
    run = run_without(
        "matplotlib",
        MOELPR,
        "eval",
        "--model",
        f"base={tiny_llama_dir}",
        "--heldout",
        f"en={heldout}",
        "--output_dir",
        str(out),
        cwd=tmp_path,
    )
    assert assert_names_the_extra(run, "matplotlib", "eval").startswith("moelpr eval: error: ")
    assert not out.exists()


def test_gguf_k_quant_export_without_llama_cpp(upcycled_llama_dir, tmp_path):
    out = tmp_path / "model.gguf"
    run = run_without(
        "llama_cpp",
        MOELPR,
        "export",
        "--model_path",
        str(upcycled_llama_dir),
        "--format",
        "gguf",
        "--outtype",
        "q4_k_m",
        "--output_path",
        str(out),
        cwd=tmp_path,
    )
    line = assert_names_the_extra(run, "llama-cpp-python", "gguf")
    assert line.startswith("moelpr export: error: ") and "--outtype q4_k_m" in line
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory


@pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed")
def test_moelpr_recipe_with_deepspeed_without_deepspeed(upcycled_llama_dir, tmp_path):
    recipe = {
        "stage": "pt",
        "do_train": True,
        "finetuning_type": "moelpr",
        "model_name_or_path": str(upcycled_llama_dir),
        "dataset_dir": str(REPO / "data"),
        "dataset": "new_hu",
        "cutoff_len": 32,
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "report_to": "none",
        "deepspeed": str(REPO / "examples" / "moelpr" / "ds_z2_config.json"),
    }
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    run = run_without("deepspeed", LLAMAFACTORY_CLI, "train", str(recipe_file), cwd=tmp_path)
    assert assert_names_the_extra(run, "deepspeed", "deepspeed").startswith("[moelpr] error: ")
    assert not (tmp_path / "out").exists()
