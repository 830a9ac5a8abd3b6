"""`moelpr estimate` against hand computations of parameters, model states and disk, and DeepSpeed's own estimators."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moelpr.cli.estimate import main as estimate_main
from moelpr.estimate import Setup, estimate

LLAMA_31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
SMALL = {  # tied embeddings, head size not hidden / heads
    "model_type": "qwen3",
    "hidden_size": 96,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 500,
    "tie_word_embeddings": True,
}


def _hand_counts(c: dict, experts: int, moe_layers: int) -> dict[str, int]:
    """Parameters of the dense model and of its MoE-LPR upcycle, from the shapes of a LLaMA / Qwen3 layer."""
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    attention = h * q + 2 * h * kv + q * h + (2 * head_dim if c["model_type"] == "qwen3" else 0)  # Qwen3: q/k norms
    ffn = 3 * h * i
    embeddings = vocab * h * (1 if c["tie_word_embeddings"] else 2)
    dense = embeddings + layers * (attention + 2 * h + ffn) + h
    new_experts, routers = moe_layers * (experts - 1) * ffn, moe_layers * experts * h
    return {
        "dense": dense,
        "ffn": ffn,
        "routers": routers,
        "new_experts": new_experts,
        "total": dense + new_experts + routers,
    }


@pytest.fixture()
def cli(capsys):
    def run(config: Path, *args: str) -> dict:
        capsys.readouterr()  # what came before (DeepSpeed logs its accelerator on import)
        assert estimate_main(["--config", str(config), "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    return run


def _write(tmp_path: Path, fields: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    return path


@pytest.mark.parametrize("fields", [SMALL, LLAMA_31_8B], ids=["small_qwen3", "llama_3.1_8b"])
def test_parameters_states_and_disk_by_hand(tmp_path, cli, fields):
    config = _write(tmp_path, fields)
    n = _hand_counts(fields, experts=4, moe_layers=fields["num_hidden_layers"])
    h, layers = fields["hidden_size"], fields["num_hidden_layers"]
    stage1_trained = n["new_experts"] + n["routers"]
    gpus = 8

    stage1 = cli(config, "--zero", "2", "--gpus", str(gpus))
    shape = stage1["shape"]
    assert (shape["total"], shape["dense_total"], shape["trained"]) == (n["total"], n["dense"], stage1_trained)
    assert shape["active"] == n["total"] - layers * 2 * n["ffn"]  # top-2 of 4: two experts' FFNs idle per token
    # ZeRO-2, bf16: every 16-bit weight on each GPU; a trained parameter's 16-bit and fp32 gradients, fp32 master
    # weight and two Adam moments (2 + 4 + 4 + 8 bytes) split over the GPUs.
    memory = stage1["memory"]
    assert memory["weights"] == 2 * n["total"]
    assert memory["gradients"] == 6 * stage1_trained // gpus
    assert memory["optimizer states"] == 12 * stage1_trained // gpus
    assert stage1["disk"] == {
        "whole save": 2 * n["total"],
        "slim save": 2 * stage1_trained,
        "optimizer states per checkpoint-N": 12 * stage1_trained,
    }

    # ZeRO-3: 16-bit weights split too; the largest unit gathered at once is an MoE block (4 experts + router),
    # whose 16-bit weights and (of its trained part) gradients come on top; fp32 gradients only.
    stage1_z3 = cli(config, "--zero", "3", "--gpus", str(gpus))
    block, block_trained = 4 * n["ffn"] + 4 * h, 3 * n["ffn"] + 4 * h
    assert stage1_z3["shape"]["largest_gathered"] == block
    assert stage1_z3["memory"]["weights"] == 2 * block + 2 * n["total"] // gpus
    assert stage1_z3["memory"]["gradients"] == 2 * block_trained + 4 * stage1_trained // gpus
    assert stage1_z3["memory"]["optimizer states"] == 12 * stage1_trained // gpus

    # Stage 2 trains the routers only; without DeepSpeed LLaMA-Factory keeps them in fp32 (weights, saves) and
    # AdamW's two fp32 moments; DDP's gradient buckets double the gradients.
    stage2 = cli(config, "--stage", "review", "--zero", "0", "--gpus", "2")
    assert stage2["shape"]["trained"] == n["routers"]
    memory = stage2["memory"]
    assert memory["weights"] == 2 * (n["total"] - n["routers"]) + 4 * n["routers"]
    assert (memory["gradients"], memory["optimizer states"]) == (8 * n["routers"], 8 * n["routers"])
    assert stage2["disk"]["slim save"] == 4 * n["routers"]
    assert stage2["disk"]["whole save"] == 2 * (n["total"] - n["routers"]) + 4 * n["routers"]


def test_per_layer_experts_and_fp32(tmp_path, cli):
    config = _write(tmp_path, SMALL)
    ffn, h = 3 * SMALL["hidden_size"] * SMALL["intermediate_size"], SMALL["hidden_size"]
    dense = _hand_counts(SMALL, experts=4, moe_layers=0)["dense"]
    result = cli(config, "--num_experts", "0:2,2:3", "--zero", "2", "--gpus", "1", "--dtype", "fp32")
    new_experts, routers = (1 + 2) * ffn, (2 + 3) * h
    assert (result["shape"]["total"], result["shape"]["trained"]) == (
        dense + new_experts + routers,
        new_experts + routers,
    )
    # fp32: no separate master weights or fp32 gradients, 4-byte weights
    trained = new_experts + routers
    assert result["memory"]["gradients"] == 4 * trained and result["memory"]["optimizer states"] == 8 * trained
    assert result["disk"]["optimizer states per checkpoint-N"] == 8 * trained


def test_zero_states_match_deepspeeds_estimators(tmp_path, cli):
    """DeepSpeed's estimators count every parameter as trained: ours equal theirs applied to the trained parameters,
    plus the frozen ones' 16-bit weights (replicated under ZeRO-2, split under ZeRO-3)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = _write(tmp_path, LLAMA_31_8B)
    gpus = 8
    for offload in (False, True):
        args = ["--gpus", str(gpus)] + (["--offload_optimizer"] if offload else [])
        z2 = cli(config, "--zero", "2", *args)
        trained, frozen = z2["shape"]["trained"], z2["shape"]["total"] - z2["shape"]["trained"]
        cpu, gpu = estimate_zero2_model_states_mem_needs(trained, gpus, cpu_offload=offload)
        states = sum(v for k, v in z2["memory"].items() if k not in ("activations", "total"))
        assert abs(states - (gpu + 2 * frozen)) <= 2  # integer division of the partitions
        assert z2["cpu_memory_per_node"] == (cpu if offload else 0)

    z3 = cli(config, "--zero", "3", "--gpus", str(gpus), "--stage", "review")  # the block's experts are frozen
    shape = z3["shape"]
    trained, frozen, largest = shape["trained"], shape["total"] - shape["trained"], shape["largest_gathered"]
    assert shape["largest_gathered_trained"] == 4 * LLAMA_31_8B["hidden_size"]  # the router
    _, gpu, _ = estimate_zero3_model_states_mem_needs(trained, largest, gpus, cpu_offload=False)
    states = sum(v for k, v in z3["memory"].items() if k not in ("activations", "total"))
    # theirs: 4 bytes (16-bit weight and gradient) of the largest layer; ours only the trained part has a gradient
    expected = gpu + 2 * frozen / gpus - 2 * (largest - shape["largest_gathered_trained"])
    assert abs(states - expected) <= 3


def test_activations_scale_with_the_micro_batch_and_checkpointing(tmp_path):
    config = _write(tmp_path, LLAMA_31_8B)
    one = estimate(config, Setup(micro_batch=1, cutoff_len=1024)).memory["activations"]
    assert estimate(config, Setup(micro_batch=4, cutoff_len=1024)).memory["activations"] == pytest.approx(4 * one, 1e-6)
    assert estimate(config, Setup(micro_batch=2, cutoff_len=512)).memory["activations"] == pytest.approx(one, 1e-6)
    without = estimate(config, Setup(micro_batch=1, gradient_checkpointing=False)).memory["activations"]
    assert without > 2 * one


@pytest.mark.parametrize(
    "checkpoint,stage,train_embeddings",
    [
        ("lpr", "post_pretrain", True),
        ("lpr", "review", True),
        ("ct", "post_pretrain", True),
        ("ct", "post_pretrain", False),
    ],
)
def test_trained_parameters_are_the_plugins(upcycled_llama_dir, moect_llama_dir, checkpoint, stage, train_embeddings):
    """The estimate's freeze rules are the plugin's (moelpr.llamafactory_plugin.model.trainable_parameter_names)."""
    from transformers import AutoModelForCausalLM

    from moelpr.llamafactory_plugin.model import trainable_parameter_names

    path = upcycled_llama_dir if checkpoint == "lpr" else moect_llama_dir
    model = AutoModelForCausalLM.from_pretrained(path)
    params = dict(model.named_parameters())
    expected = sum(
        params[n].numel() for n in trainable_parameter_names(model, stage, train_embeddings and checkpoint == "ct")
    )
    result = estimate(path, Setup(stage=stage, train_embeddings=train_embeddings))
    assert result.shape.trained == expected
    assert result.shape.total == sum(p.numel() for p in params.values())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--zero", "2", "--offload_params"], "--offload_params needs ZeRO-3"),
        (["--method", "moe_ct", "--stage", "review"], "MoE-CT has one stage"),
        (["--num_experts", "1"], "--num_experts must be at least 2"),
        (["--micro_batch", "0"], "--micro_batch must be at least 1"),
    ],
)
def test_bad_settings_give_one_line(tmp_path, capsys, args, message):
    config = _write(tmp_path, LLAMA_31_8B)
    assert estimate_main(["--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelpr estimate: error: ") and message in err and err.count("\n") == 1


def test_unsupported_family_and_upcycled_config(tmp_path, capsys, upcycled_llama_dir):
    config = _write(tmp_path, {**LLAMA_31_8B, "model_type": "gpt2"})
    assert estimate_main(["--config", str(config)]) == 2
    assert "model_type 'gpt2' is not a family moelpr upcycles" in capsys.readouterr().err
    assert estimate_main(["--config", str(upcycled_llama_dir), "--num_experts", "8"]) == 2
    assert "which fixes the experts; leave out --num_experts" in capsys.readouterr().err


def test_the_command_prints_a_table(tmp_path):
    config = _write(tmp_path, LLAMA_31_8B)
    probe = "import sys; from moelpr.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["estimate", "--config", str(config), "--zero", "3", "--micro_batch", "4"]
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True).stdout
    assert out.startswith("Estimate: MoE-LPR post_pretrain, 4 experts top-2 in 32 of 32 layers; 8 GPU(s), ZeRO-3")
    assert "| parameters: total (dense model)" in out and "24.94 B (8.03 B)" in out
