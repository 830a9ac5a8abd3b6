"""Both MoE-LPR stages under DeepSpeed ZeRO-2 and ZeRO-3, through the real `llamafactory-cli train` with the
shipped configs, on 2 CPU processes: under ZeRO-2 on one node, under ZeRO-3 on two (LLaMA-Factory's multi-node
launch, `NNODES=2` and a `NODE_RANK` each, over loopback), where stage 1 also stops at a checkpoint and resumes.

DeepSpeed 0.16.4 runs there with its CPU accelerator: gloo (oneCCL is not installed), the trainer's torch AdamW
as a client optimizer (the configs set `zero_allow_untested_optimizer`), float32 ("auto" bf16/fp16 stay off).
Two things differ from a GPU run:

- `use_cpu` must stay off. With it, transformers sets up torch.distributed without DeepSpeed's communication
  layer, so ZeRO-3's `zero.Init` at model load sees a world of one process and fails DeepSpeed's batch-size
  check (`8 != 2 * 2 * 1`). Without it, accelerate initialises DeepSpeed's communication as on GPUs, and with
  no GPU visible it runs on the CPU with gloo anyway.
- DeepSpeed's communication layer JIT-compiles its shared-memory op (g++ and ninja) the first time it starts
  on a machine, and caches it in ~/.cache/torch_extensions.

The router losses reach the router only through gradients injected in the MoE blocks and scaled by whatever
the engine applied to the returned loss (moelpr/models/moe.py), so the review stage's LPR loss must move the
routers here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llamafactory_cli import CLI, REPO, node_log, train_both_stages
from safetensors.torch import load_file
from test_plugin_e2e import changed, old_language_expert0_share, routing_log, weights

pytestmark = pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed")

# The processes on the CPU accelerator even where a GPU is visible.
ON_CPU = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
TWO_CPU_PROCESSES = {**ON_CPU, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
# ZeRO stage: how the two processes are launched.
LAUNCHES = {
    2: {"nodes": 1, "env": TWO_CPU_PROCESSES},
    3: {"nodes": 2, "env": {**ON_CPU, "NPROC_PER_NODE": "1"}, "stage1_stop": 2, "save_steps": 1},
}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda stage: f"zero{stage}")
def zero_outputs(request, upcycled_llama_dir, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp(f"zero{request.param}")
    under_deepspeed = {
        "deepspeed": str(REPO / "examples" / "moelpr" / f"ds_z{request.param}_config.json"),
        "use_cpu": False,
        "save_steps": 100,  # only the final model unless the launch resumes: DeepSpeed checkpoints are slow to write
        "plot_loss": False,
        **LAUNCHES[request.param],
    }
    return {**train_both_stages(tmp, upcycled_llama_dir, stage1_steps=3, stage2_steps=4, **under_deepspeed), "tmp": tmp}


def test_stage1_under_zero_changes_exactly_the_new_experts_and_routers(zero_outputs):
    upcycled = weights(zero_outputs["upcycled"])
    trainable = {k for k in upcycled if ".mlp.router." in k or ".mlp.new_experts." in k}
    # Bit for bit: every other tensor of the saved model (gathered from the ZeRO-3 partitions) is the original.
    assert changed(upcycled, weights(zero_outputs["stage1"])) == trainable


def test_stage2_under_zero_changes_exactly_the_routers(zero_outputs):
    upcycled, stage1, stage2 = (weights(zero_outputs[k]) for k in ("upcycled", "stage1", "stage2"))
    routers = {k for k in upcycled if ".mlp.router." in k}
    assert len(routers) == 4
    assert changed(stage1, stage2) == routers
    # The saves are slim (docs/checkpoints.md): ZeRO-3 gathers and writes the trained tensors only.
    assert set(load_file(zero_outputs["stage2"] / "model.safetensors")) == routers
    untouched = {k for k in upcycled if ".mlp.router." not in k and ".mlp.new_experts." not in k}
    assert not changed({k: upcycled[k] for k in untouched}, {k: stage2[k] for k in untouched})


def test_review_under_zero_pulls_old_language_tokens_to_expert0(zero_outputs):
    # Measured under ZeRO-2 on this recipe: expert 0's top-1 share of the English tokens goes from 0.22 to 0.96,
    # while with `lpr_loss_coef: 0` (the LM loss alone) it falls to 0.01.
    before = old_language_expert0_share(zero_outputs["stage1"])
    after = old_language_expert0_share(zero_outputs["stage2"])
    assert after > before + 0.3, (before, after)
    logged = [entry for entry in routing_log(zero_outputs["stage2"]) if "loss" in entry]
    assert [entry["current_steps"] for entry in logged] == [1, 2, 3, 4]
    assert logged[-1]["lpr_loss"] < logged[0]["lpr_loss"]


@pytest.mark.parametrize("zero_outputs", [3], indirect=True, ids=["zero3"])
def test_two_nodes_write_the_slim_model_once_and_resume(zero_outputs):
    logs = "\n".join(node_log(zero_outputs["tmp"], "stage1", rank).read_text() for rank in (0, 1))
    # Both nodes of the second launch took up the first launch's last checkpoint and trained the one step left.
    assert logs.count("Resuming training from checkpoint with epoch 0 and global step 2") == 2
    assert json.loads((zero_outputs["stage1"] / "trainer_state.json").read_text())["global_step"] == 3
    # Only the first node's first process writes the model: once per save, the final one included.
    assert logs.count(f"Model weights saved in {zero_outputs['stage1']}/model.safetensors") == 1
    assert logs.count("Model weights saved in") == 2  # checkpoint-3 and the output
