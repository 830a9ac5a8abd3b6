"""Hub ids where a command takes a model path, resolved through huggingface_hub's cache as LLaMA-Factory's
``model_name_or_path`` is: an offline cache stands in for the Hub."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moelpr.checkpoints.model_dir import require_model_dir
from moelpr.checkpoints.streaming import CheckpointError
from moelpr.cli import main

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face cache at ``root`` holding ``model_dir`` as the main revision of model repo ``repo_id``, laid out
    as huggingface_hub lays out what it downloads."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


def moelpr(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["moelpr", *args], capture_output=True, text=True, check=False, env=env, cwd=cwd)


def test_upcycle_reads_a_hub_id_from_the_cache(tiny_llama_dir, tmp_path):
    cache = hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_llama_dir)
    out = tmp_path / "moe"
    result = moelpr(
        "upcycle", "--model_path", "tiny-org/tiny-llama", "--output_path", str(out), "--num_experts", "2",
        cache=cache, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama_moelpr"
    dense = load_file(tiny_llama_dir / "model.safetensors")
    expert = model.model.layers[1].mlp.new_experts[0].up_proj.weight
    assert torch.equal(expert, dense["model.layers.1.mlp.up_proj.weight"])


def test_a_hub_id_neither_cached_nor_reachable_gets_one_line(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    # As HF_HUB_OFFLINE=1 and HF_HUB_CACHE set it, in this process.
    cache = hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_llama_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "moe"
    assert main(["upcycle", "--model_path", "tiny-org/missing", "--output_path", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "moelpr upcycle: error: --model_path tiny-org/missing is neither a local directory nor a model on the Hugging "
        f"Face Hub: not in the Hugging Face cache ({cache}) and the Hub is out of reach (offline, or HF_HUB_OFFLINE=1)"
    ]
    assert not out.exists()
    # The cached repo resolves to its snapshot, in this process too.
    assert require_model_dir("tiny-org/tiny-llama") == cache / "models--tiny-org--tiny-llama" / "snapshots" / REVISION


def test_a_local_path_wins_over_a_hub_id_and_what_is_no_repo_id_is_no_model_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "no-config").mkdir(parents=True)
    # Exists locally: never looked up on the Hub, though it reads as a repo id.
    with pytest.raises(CheckpointError, match=r"^--model_path tiny-org/no-config is not a model directory \(no config"):
        require_model_dir("tiny-org/no-config")
    for path in ("./missing", "../a/b/c", str(tmp_path / "missing")):
        with pytest.raises(CheckpointError, match=r"is not a model directory \(no config.json there\)$"):
            require_model_dir(path)
