"""Saves and resumes of runs on an upcycled model (docs/checkpoints.md): a moelpr run killed anywhere, or stopped by
a full disk, and started again with the same command ends as the uninterrupted run; other fine-tuning types save and
resume as LLaMA-Factory's own do."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from llamafactory_cli import CLI, launch, write_recipe
from safetensors.torch import load_file

from moelpr.checkpoints.slim import REFERENCE_NAME, read_reference
from moelpr.llamafactory_plugin.checkpoint_saves import (
    CheckpointSaveError,
    last_complete_checkpoint,
    marked_as_saving,
    saving_marker,
)

# tests/process_hooks/sitecustomize.py: MOELPR_TEST_FAULT makes a training process die or fail at a chosen moment.
HOOKS = Path(__file__).parent / "process_hooks"
HUB_ID = "moelpr-test/tiny-upcycled"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"

cli_only = pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed")


def with_hooks(env: dict[str, str]) -> dict[str, str]:
    return {**env, "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")])}


def same_tensors(a: Path, b: Path) -> bool:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_resume_skips_checkpoints_whose_save_did_not_finish(tmp_path):
    assert last_complete_checkpoint(tmp_path) is None
    for step in (2, 4, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    saving_marker(tmp_path / "checkpoint-10").touch()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    saving_marker(tmp_path / "checkpoint-2").touch()
    saving_marker(tmp_path / "checkpoint-4").touch()
    assert last_complete_checkpoint(tmp_path) is None


def test_a_save_is_marked_until_every_process_wrote_its_files(tmp_path):
    checkpoint, barriers = tmp_path / "checkpoint-3", []
    (tmp_path / "checkpoint-1").mkdir()
    checkpoint.mkdir()
    (checkpoint / "stale.bin").write_text("left by a run killed inside this save")
    saving_marker(checkpoint).touch()
    with marked_as_saving(checkpoint, True, lambda: barriers.append(saving_marker(checkpoint).exists())):
        assert not checkpoint.exists()  # the interrupted save's leftovers are gone
        checkpoint.mkdir()
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert barriers == [True, True] and last_complete_checkpoint(tmp_path) == str(checkpoint)

    with pytest.raises(CheckpointSaveError, match=r"checkpoint-5 \(No space left on device\).*checkpoint-3 is the"):
        with marked_as_saving(tmp_path / "checkpoint-5", True, lambda: None):
            (tmp_path / "checkpoint-5").mkdir()
            raise OSError(28, "No space left on device")
    assert not (tmp_path / "checkpoint-5").exists() and not saving_marker(tmp_path / "checkpoint-5").exists()


@pytest.fixture(scope="module")
def hub_cache(upcycled_llama_dir, tmp_path_factory) -> Path:
    """An offline Hugging Face cache that holds the tiny upcycled model as the Hub repo HUB_ID."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(upcycled_llama_dir, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return cache


@cli_only
def test_a_stage1_run_killed_or_out_of_disk_and_started_again_ends_as_the_uninterrupted_run(
    stage_outputs, hub_cache, tmp_path
):
    # stage_outputs' stage 1 is the uninterrupted run of this recipe; here the base is the same model as a Hub id.
    recipe = write_recipe(
        tmp_path,
        "stage1",
        model_name_or_path=HUB_ID,
        moelpr_stage="post_pretrain",
        dataset="new_hu,new_tr",
        learning_rate=1e-3,
        max_steps=4,
    )
    out, uninterrupted = tmp_path / "stage1", stage_outputs["stage1"]
    env = with_hooks({"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})

    def run(fault: str | None = None):
        return launch(recipe, tmp_path, {**env, "MOELPR_TEST_FAULT": fault} if fault else env)

    killed = run("training_step@2:kill")  # in step 3, after checkpoint-2
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "checkpoint-2" / "optimizer.pt").is_file() and not saving_marker(out / "checkpoint-2").exists()

    full = run("_save_optimizer_and_scheduler@4:disk_full")  # inside the save of checkpoint-4, after its model
    assert full.returncode != 0 and "Traceback" not in full.stderr, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("[moelpr] error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"[moelpr] error: no space left on the device while saving {out / 'checkpoint-4'}"
    )
    assert f"{out / 'checkpoint-2'} is the last complete checkpoint" in full.stderr
    assert not (out / "checkpoint-4").exists()
    expected = {p.name for p in (uninterrupted / "checkpoint-2").iterdir()}
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == expected
    assert same_tensors(out / "checkpoint-2", uninterrupted / "checkpoint-2")

    killed = run("_save_optimizer_and_scheduler@4:kill")  # inside the save of checkpoint-4 again
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "checkpoint-4" / "model.safetensors").is_file() and saving_marker(out / "checkpoint-4").exists()

    finished = run()
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"Resuming training from {out / 'checkpoint-2'}." in finished.stdout + finished.stderr
    assert same_tensors(out, uninterrupted) and same_tensors(out / "checkpoint-4", uninterrupted / "checkpoint-4")
    assert (out / "checkpoint-4" / "optimizer.pt").is_file() and not saving_marker(out / "checkpoint-4").exists()
    assert read_reference(out).base == HUB_ID  # resumed twice from a checkpoint whose base is a Hub id


@cli_only
@pytest.mark.parametrize("finetuning_type", ["lora", "full", "freeze"])
def test_other_finetuning_types_on_an_upcycled_model_save_and_resume_as_llamafactory_does(
    finetuning_type, upcycled_llama_dir, tmp_path
):
    settings = {"lora_target": "q_proj,v_proj"} if finetuning_type == "lora" else {}
    recipe = write_recipe(
        tmp_path,
        "out",
        model_name_or_path=str(upcycled_llama_dir),
        finetuning_type=finetuning_type,
        dataset="new_hu",
        learning_rate=1e-3,
        max_steps=2,
        save_steps=1,
        **settings,
    )
    out = tmp_path / "out"
    killed = launch(recipe, tmp_path, with_hooks({"MOELPR_TEST_FAULT": "training_step@1:kill"}))
    assert killed.returncode == -9, killed.stderr[-3000:]
    finished = launch(recipe, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"Resuming training from {out / 'checkpoint-1'}." in finished.stdout + finished.stderr

    assert not list(out.rglob(REFERENCE_NAME)) and not list(out.glob("*.moelpr-saving"))
    if finetuning_type == "lora":
        assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    else:  # whole: it needs no base
        names = set(load_file(Path(upcycled_llama_dir) / "model.safetensors"))
        assert set(load_file(out / "model.safetensors")) == names
        assert set(load_file(out / "checkpoint-2" / "model.safetensors")) == names
