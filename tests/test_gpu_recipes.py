"""The GPU recipes (examples/moelpr/gpu/): LLaMA-Factory's own parser reads each with its DeepSpeed config, each
carries the authors' settings and fits 8 x 80 GB by `moelpr estimate`, and Llama-3.1-8B's two stages train on the
CPU through `llamafactory-cli train` with a tiny model, keeping the DeepSpeed config and every method key.

LLaMA-Factory parses a DeepSpeed recipe only inside a distributed launch, so the parse runs in a subprocess that is
a one-process torch.distributed world (what torchrun would set up), on DeepSpeed's CPU accelerator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from llamafactory_cli import CLI, REPO, free_port, train
from safetensors import safe_open
from test_plugin_deepspeed import TWO_CPU_PROCESSES

from moelpr.estimate import Setup, estimate

GPU_RECIPES = REPO / "examples" / "moelpr" / "gpu"
RECIPES = sorted(GPU_RECIPES.glob("*/stage*.yaml"))
GPUS = 8
GPU_MEMORY = 80e9
# The authors' launch scripts (github.com/zjwang21/MoE-LPR, LLaMA-Factory/scripts/stage1.sh and stage2.sh):
# per-device batch x accumulation x 4 GPUs, learning rate, block length, documents per dataset.
AUTHORS = {
    "stage1": {"global_batch": 16 * 4 * 4, "learning_rate": 5e-5, "cutoff_len": 1024, "max_samples": None},
    "stage2": {"global_batch": 4 * 8 * 4, "learning_rate": 5e-5, "cutoff_len": 512, "max_samples": 50000},
}
METHOD_KEYS = {
    "stage1": {"moelpr_stage": "post_pretrain", "aux_loss_coef": 0.01},
    "stage2": {"moelpr_stage": "review", "lpr_loss_coef": 0.1, "lpr_loss_form": "authors", "generate_lang_mask": True},
}

PARSE = """
import json, sys, yaml
import moelpr.llamafactory_plugin as plugin
from llamafactory.hparams import get_train_args
plugin.apply()
parsed = {}
for recipe_file in sys.argv[2:]:
    recipe = yaml.safe_load(open(recipe_file))
    # A tiny model in place of the upcycled one; bf16 is for GPUs (transformers refuses it on this CPU set-up).
    recipe.update(model_name_or_path=sys.argv[1], output_dir="unused", bf16=False)
    model_args, data_args, training, finetuning, _ = get_train_args(recipe)
    parsed[recipe_file] = {
        "zero_stage": training.hf_deepspeed_config.config["zero_optimization"]["stage"],
        "micro_batch": training.per_device_train_batch_size,
        "accumulation": training.gradient_accumulation_steps,
        "learning_rate": training.learning_rate,
        "scheduler": str(training.lr_scheduler_type),
        "epochs": training.num_train_epochs,
        "gradient_checkpointing": not model_args.disable_gradient_checkpointing,
        "cutoff_len": data_args.cutoff_len,
        "max_samples": data_args.max_samples,
        "generate_lang_mask": data_args.generate_lang_mask,
        **{key: getattr(finetuning, key) for key in ("moelpr_stage", "aux_loss_coef", "lpr_loss_coef", "lpr_loss_form")},
    }
print(json.dumps(parsed))
"""


def _stage(recipe: Path) -> str:
    return recipe.stem


@pytest.fixture(scope="module")
def parsed(upcycled_llama_dir) -> dict[str, dict]:
    world_of_one = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "CUDA_VISIBLE_DEVICES": "",
        "DS_ACCELERATOR": "cpu",
    }
    run = subprocess.run(
        [sys.executable, "-c", PARSE, str(upcycled_llama_dir), *map(str, RECIPES)],
        cwd=REPO,  # the recipes' relative paths (data/, examples/moelpr/ds_z*_config.json) as a user runs them
        env={**os.environ, **world_of_one},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    return {
        Path(name).relative_to(GPU_RECIPES).as_posix(): v for name, v in json.loads(run.stdout.splitlines()[-1]).items()
    }


def test_three_models_two_stages_each():
    assert [r.relative_to(GPU_RECIPES).as_posix() for r in RECIPES] == [
        f"{model}/stage{n}.yaml" for model in ("llama-3.1-8b", "qwen2.5-1.5b", "qwen2.5-7b") for n in (1, 2)
    ]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.parent.name}-{r.stem}")
def test_recipe_parses_with_the_authors_settings(parsed, recipe):
    args = parsed[recipe.relative_to(GPU_RECIPES).as_posix()]
    authors = AUTHORS[_stage(recipe)]
    assert args["micro_batch"] * args["accumulation"] * GPUS == authors["global_batch"]
    assert (args["learning_rate"], args["cutoff_len"], args["max_samples"]) == (
        authors["learning_rate"],
        authors["cutoff_len"],
        authors["max_samples"],
    )
    assert (args["scheduler"], args["epochs"]) == ("SchedulerType.COSINE", 1.0)
    assert args["gradient_checkpointing"]
    assert {key: args[key] for key in METHOD_KEYS[_stage(recipe)]} == METHOD_KEYS[_stage(recipe)]
    assert yaml.safe_load(recipe.read_text())["bf16"] is True  # replaced for the CPU parse only
    assert args["zero_stage"] in (2, 3)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.parent.name}-{r.stem}")
def test_recipe_fits_eight_80gb_gpus_by_the_estimate(parsed, recipe):
    """Sized with `moelpr estimate`, with a tenth of the memory left for what it does not count (the CUDA context,
    communication buckets, fragmentation)."""
    args = parsed[recipe.relative_to(GPU_RECIPES).as_posix()]
    setup = Setup(
        stage=args["moelpr_stage"],
        gpus=GPUS,
        zero_stage=args["zero_stage"],
        micro_batch=args["micro_batch"],
        cutoff_len=args["cutoff_len"],
        gradient_checkpointing=args["gradient_checkpointing"],
    )
    result = estimate(recipe.parent / "dense_config.json", setup)
    assert result.memory["total"] < 0.9 * GPU_MEMORY, result.memory


def _keys(safetensors_file: Path) -> set[str]:
    with safe_open(safetensors_file, "pt") as handle:
        return set(handle.keys())


@pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed")
def test_llama_recipes_train_on_the_cpu(upcycled_llama_dir, tmp_path):
    """Both stages as the recipes set them, on two CPU processes: only the model, the batch and block sizes, the
    step budget, the precision and the tokenizing workers are replaced; the DeepSpeed config (ZeRO-3, then ZeRO-2)
    and every method key stay."""
    outputs = {}
    for stage, model in (("stage1", upcycled_llama_dir), ("stage2", None)):
        recipe = yaml.safe_load((GPU_RECIPES / "llama-3.1-8b" / f"{stage}.yaml").read_text())
        cpu_safe = {
            "model_name_or_path": str(model or outputs["stage1"]),
            "output_dir": str(tmp_path / stage),
            "dataset_dir": str(REPO / recipe["dataset_dir"]),
            "deepspeed": str(REPO / recipe["deepspeed"]),  # the same file, as an absolute path
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "cutoff_len": 32,
            "max_steps": 2,
            "bf16": False,
            "preprocessing_num_workers": 1,
            "use_cpu": False,  # DeepSpeed on the CPU: see test_plugin_deepspeed.py
        }
        outputs[stage] = train(tmp_path, stage, env=TWO_CPU_PROCESSES, **{**recipe, **cpu_safe})
        state = json.loads((outputs[stage] / "trainer_state.json").read_text())
        assert state["global_step"] == 2
        run_args = torch.load(outputs[stage] / "training_args.bin", weights_only=False)
        assert run_args.deepspeed == cpu_safe["deepspeed"]

    stage1_config = json.loads((outputs["stage1"] / "config.json").read_text())
    assert stage1_config["router_aux_loss_coef"] == 0.01
    trained = _keys(outputs["stage1"] / "model.safetensors")  # slim saves: what the stage trains
    assert trained and all(".mlp.router." in k or ".mlp.new_experts." in k for k in trained)
    stage2_config = json.loads((outputs["stage2"] / "config.json").read_text())
    assert (stage2_config["lpr_loss_coef"], stage2_config["lpr_loss_form"]) == (0.1, "authors")
    routers = _keys(outputs["stage2"] / "model.safetensors")
    assert routers and all(".mlp.router." in k for k in routers)
