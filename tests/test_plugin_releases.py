"""The plugin never breaks its host: with a LLaMA-Factory or transformers release it was not checked against,
LLaMA-Factory runs as if moelpr were not installed (one warning line), and only a moelpr recipe is refused.

"An unknown release" is made the way pip would show one: a ``llamafactory-0.9.99.dist-info`` first on
``PYTHONPATH``, so that the installed package's metadata reads 0.9.99 while its code stays the installed 0.9.5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from llamafactory_cli import CLI, REPO, train

import _moelpr_startup_hook as hook

pytestmark = pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed")


def reported_as(tmp_path: Path, name: str, version: str) -> dict[str, str]:
    """The environment of a process in which the installed ``name`` reports itself as ``version``."""
    site = tmp_path / f"{name}-{version}-metadata"
    dist_info = site / f"{name}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def run_python(probe: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, cwd=cwd, env={**os.environ, **env}
    )


def test_releases_outside_the_checked_ranges_are_named(tmp_path):
    probe = "import _moelpr_startup_hook as hook; print(hook.releases_outside_plugin_ranges())"
    assert run_python(probe, {}, tmp_path).stdout.strip() == "[]"
    for name, version in (("llamafactory", "0.9.99"), ("transformers", "5.99.0")):
        run = run_python(probe, reported_as(tmp_path, name, version), tmp_path)
        assert run.stdout.strip() == str([f"{name} {version}"]), run.stderr[-2000:]


def test_recipe_asks_for_moelpr(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"stage": "pt", "finetuning_type": "moelpr"}))
    lora = tmp_path / "lora.json"
    lora.write_text('{"finetuning_type": "lora"}')
    assert hook.recipe_asks_for_moelpr(["llamafactory-cli", str(recipe)])
    assert not hook.recipe_asks_for_moelpr(["llamafactory-cli", str(recipe), "finetuning_type=lora"])
    assert not hook.recipe_asks_for_moelpr(["llamafactory-cli", str(lora)])
    assert hook.recipe_asks_for_moelpr(["llamafactory-cli", str(lora), "finetuning_type=moelpr"])
    assert hook.recipe_asks_for_moelpr(["launcher.py", "--stage", "pt", "--finetuning_type", "moelpr"])
    assert not hook.recipe_asks_for_moelpr(["launcher.py", "--finetuning_type=full"])
    assert not hook.recipe_asks_for_moelpr(["llamafactory-cli", str(tmp_path / "missing.yaml")])
    assert not hook.recipe_asks_for_moelpr(["llamafactory-cli"])


def test_unknown_llamafactory_release_leaves_llamafactory_untouched(tmp_path):
    probe = (
        "import sys; import llamafactory.train.tuner, llamafactory.webui.interface; "
        "from llamafactory.hparams import parser; from llamafactory.webui.components import top; "
        "print([c.__name__ for c in parser._TRAIN_ARGS], parser._parse_train_args.__module__, "
        "'moelpr' in top.METHODS, 'moelpr' in sys.modules)"
    )
    run = run_python(probe, reported_as(tmp_path, "llamafactory", "0.9.99"), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == (
        "['ModelArguments', 'DataArguments', 'TrainingArguments', 'FinetuningArguments', 'GeneratingArguments'] "
        "llamafactory.hparams.parser False False"
    )
    warnings = [line for line in run.stderr.splitlines() if "moelpr" in line]
    assert len(warnings) == 1 and warnings[0].startswith("[moelpr] warning: ")
    assert "llamafactory 0.9.99 is installed" in warnings[0] and "llamafactory>=0.9.5,<0.9.6" in warnings[0]


def test_unknown_llamafactory_release_trains_a_full_recipe(tiny_llama_dir, tmp_path):
    out = train(
        tmp_path,
        "full",
        env=reported_as(tmp_path, "llamafactory", "0.9.99"),
        model_name_or_path=str(tiny_llama_dir),
        finetuning_type="full",
        dataset="new_hu",
        max_steps=1,
    )
    assert (out / "model.safetensors").is_file() and (out / "train_results.json").is_file()


def test_unknown_llamafactory_release_refuses_a_moelpr_recipe_in_one_line(upcycled_llama_dir, tmp_path):
    recipe = {
        "stage": "pt",
        "do_train": True,
        "finetuning_type": "moelpr",
        "model_name_or_path": str(upcycled_llama_dir),
        "dataset_dir": str(REPO / "data"),
        "dataset": "new_hu",
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
    }
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    run = subprocess.run(
        [CLI, "train", str(recipe_file)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, **reported_as(tmp_path, "llamafactory", "0.9.99")},
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "[moelpr] error: finetuning_type: moelpr needs llamafactory>=0.9.5,<0.9.6 with transformers>=5.6,<5.7, and "
        "llamafactory 0.9.99 is installed: pip install 'llamafactory>=0.9.5,<0.9.6' 'transformers>=5.6,<5.7'"
    ]
    assert not (tmp_path / "out").exists()
