"""The upcycling command: what it writes, and the one-line errors for requests it cannot serve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_dense_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelpr.checkpoints.streaming import ShardedWriter, TensorSpec
from moelpr.cli.upcycle import main
from moelpr.upcycling.settings import UpcycleSettings, expert_layout, parse_layers
from moelpr.upcycling.upcycle import upcycle

REPO = Path(__file__).resolve().parent.parent


def test_script_writes_a_checkpoint_with_copied_experts(tiny_llama_dir, tmp_path):
    out = tmp_path / "moe"
    result = subprocess.run(
        [sys.executable, str(REPO / "upcycling.py"), "--model_path", str(tiny_llama_dir), "--output_path", str(out),
         "--num_experts", "3", "--topk", "1", "--moe_layers", "0,2", "--seed", "7"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"], config["moe_layers"]) == (
        "llama_moelpr", 3, 1, [0, 2]
    )
    assert (out / "tokenizer.json").is_file()
    moe = load_file(out / "model.safetensors")
    dense = load_file(tiny_llama_dir / "model.safetensors")
    for suffix in ("gate_proj", "up_proj", "down_proj"):
        original = dense[f"model.layers.2.mlp.{suffix}.weight"]
        assert torch.equal(moe[f"model.layers.2.mlp.original_expert.{suffix}.weight"], original)
        assert torch.equal(moe[f"model.layers.2.mlp.new_experts.1.{suffix}.weight"], original)
        assert torch.equal(moe[f"model.layers.1.mlp.{suffix}.weight"], dense[f"model.layers.1.mlp.{suffix}.weight"])
    assert moe["model.layers.0.mlp.router.weight"].shape == (3, 64)
    assert not any(k.startswith("model.layers.1.mlp.router") for k in moe)


def test_router_initialisation_follows_the_seed(tiny_llama_dir, tmp_path):
    routers = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["--model_path", str(tiny_llama_dir), "--output_path", str(tmp_path / name), "--seed", str(seed)]) == 0
        routers.append(load_file(tmp_path / name / "model.safetensors")["model.layers.0.mlp.router.weight"])
    assert torch.equal(routers[0], routers[1])
    assert not torch.equal(routers[0], routers[2])


def _gpt2_dir(tmp_path: Path) -> Path:
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (path / "tokenizer.json").write_text("{}")
    return path


def _copy_without_weights(dense_dir: Path, path: Path) -> Path:
    shutil.copytree(dense_dir, path, ignore=shutil.ignore_patterns("*.safetensors*"))
    return path


def _broken_dense_dirs(dense_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """Dense checkpoints upcycling must refuse: .bin weights, a missing shard, an FFN without its up_proj, a
    truncated file (found only when its last tensor is read, with part of the output written)."""
    weights = load_file(dense_dir / "model.safetensors")
    bin_dir = _copy_without_weights(dense_dir, tmp_path / "bin")
    torch.save(weights, bin_dir / "pytorch_model.bin")
    missing_shard = _copy_without_weights(dense_dir, tmp_path / "missing_shard")
    save_file(weights, missing_shard / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = dict.fromkeys(weights, "model-00001-of-00002.safetensors")
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (missing_shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    no_up_proj = _copy_without_weights(dense_dir, tmp_path / "no_up_proj")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, no_up_proj / "model.safetensors", metadata={"format": "pt"})
    truncated = _copy_without_weights(dense_dir, tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes((dense_dir / "model.safetensors").read_bytes()[:-100])
    return {"bin": bin_dir, "missing_shard": missing_shard, "no_up_proj": no_up_proj, "truncated": truncated}


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("unsupported", ["--model_path", "{gpt2}"],
         "cannot upcycle model_type 'gpt2': supported families are gemma3_text, llama, mistral, qwen2, qwen3 (adding "
         "one takes two small files, see docs/adding_a_family.md)."),
        ("one expert", ["--num_experts", "1"], "--num_experts must be at least 2"),
        ("not a count", ["--num_experts", "four"], "--num_experts 'four' is neither a count"),
        ("topk too large", ["--num_experts", "2", "--topk", "3"], "--topk must be between 1 and --num_experts (2)"),
        ("missing path", ["--model_path", "{missing}"], "is not a model directory"),
        ("no tokenizer", ["--model_path", "{no_tokenizer}"], "has no tokenizer files"),
        ("bad layers", ["--moe_layers", "0,9"], "names layers outside 0..3"),
        ("output holds a model", ["--output_path", "{dense}"], "already holds a model"),
        ("already upcycled", ["--model_path", "{upcycled}"], "already an upcycled MoE-LPR model"),
        ("bin weights", ["--model_path", "{bin}"], "holds PyTorch .bin weights; only safetensors"),
        ("missing shard", ["--model_path", "{missing_shard}"], "model-00002-of-00002.safetensors, listed in"),
        ("ffn mismatch", ["--model_path", "{no_up_proj}"],
         "layer 2's FFN (model.layers.2.mlp.*) holds ['down_proj.weight', 'gate_proj.weight'] in the checkpoint, "
         "but a llama FFN has ['down_proj.weight', 'gate_proj.weight', 'up_proj.weight']"),
        ("truncated weights", ["--model_path", "{truncated}"], "model.safetensors is truncated (in the data of"),
        ("bad shard size", ["--max_shard_size", "5XB"], "--max_shard_size: cannot read '5XB' as a size"),
        # Per-layer expert counts.
        ("spec and layers", ["--num_experts", "0-1:2,2-3:4", "--moe_layers", "0,1"],
         "--num_experts '0-1:2,2-3:4' names the upcycled layers itself; leave out --moe_layers"),
        ("overlap", ["--num_experts", "0-2:2,2-3:4"], "layer(s) [2] fall in more than one range"),
        ("spec count below 2", ["--num_experts", "0-1:1,2-3:4"], "'0-1:1' gives 1 experts; an upcycled layer needs"),
        ("spec topk", ["--num_experts", "0-1:2,2-3:4", "--topk", "3"],
         "--topk must be between 1 and the smallest expert count in --num_experts (2), got 3"),
        ("spec out of range", ["--num_experts", "0-1:2,3-4:4"], "'3-4:4' names layers outside 0..3"),
        ("spec syntax", ["--num_experts", "0-1:2,x:3"], "'x:3' is not LAYERS:COUNT"),
        # MoE-CT counts routed experts, at least one, with its own defaults (2 experts, top-1).
        ("ct without experts", ["--method", "moe_ct", "--num_experts", "0"],
         "--num_experts must be at least 1 (one routed expert beside the original FFN), got 0"),
        ("ct spec without experts", ["--method", "moe_ct", "--num_experts", "0-1:0,2-3:2"],
         "'0-1:0' gives 0 experts; an upcycled layer needs at least 1 (one routed expert beside the original FFN)"),
        ("ct topk", ["--method", "moe_ct", "--topk", "3"], "--topk must be between 1 and --num_experts (2), got 3"),
        ("ct auto", ["--method", "moe_ct", "--num_experts", "auto:4"], "is not available with --method moe_ct"),
    ],
)
def test_bad_requests_get_one_clear_line_and_write_nothing(
    case, args, message, tiny_llama_dir, upcycled_llama_dir, tmp_path, capsys
):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    no_tokenizer = inputs / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", no_tokenizer / "config.json")
    paths = {"gpt2": _gpt2_dir(inputs), "missing": tmp_path / "nope", "dense": tiny_llama_dir,
             "upcycled": upcycled_llama_dir, "no_tokenizer": no_tokenizer, **_broken_dense_dirs(tiny_llama_dir, inputs)}
    argv = {"--model_path": str(tiny_llama_dir), "--output_path": str(tmp_path / "out")}
    for key, value in zip(args[::2], args[1::2]):
        argv[key] = value.format(**paths)
    assert main([item for pair in argv.items() for item in pair]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_layer_specs():
    assert parse_layers(None, 6) is None
    assert parse_layers("all", 6) is None
    assert parse_layers("every:2", 6) == [0, 2, 4]
    assert parse_layers("5,0-2", 6) == [0, 1, 2, 5]


def test_console_command_is_installed():
    result = subprocess.run(["moelpr", "upcycle", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--num_experts" in result.stdout


def test_expert_count_specs():
    assert expert_layout("4", None, 2, 6) == (None, 4)
    assert expert_layout(3, "every:2", 1, 6) == ([0, 2, 4], 3)
    assert expert_layout(3, [4, 1], 1, 6) == ([1, 4], 3)
    assert expert_layout("0-1:2,3-5:4", None, 2, 6) == ([0, 1, 3, 4, 5], [2, 2, 4, 4, 4])
    assert expert_layout("4:3, 0-1:2", None, 2, 6) == ([0, 1, 4], [2, 2, 3])
    # Equal counts are stored as one count.
    assert expert_layout("0-5:3", None, 2, 6) == (None, 3)
    assert expert_layout("1-2:3", None, 2, 6) == ([1, 2], 3)


def test_per_layer_expert_counts_reach_the_config_and_the_blocks(tiny_llama_dir, tmp_path):
    out = upcycle(tiny_llama_dir, tmp_path / "moe", UpcycleSettings(num_experts="0:2,2-3:3", top_k=2))
    config = json.loads((out / "config.json").read_text())
    assert (config["moe_layers"], config["num_experts"]) == ([0, 2, 3], [2, 3, 3])
    model = AutoModelForCausalLM.from_pretrained(out)
    counts = [layer.mlp.router.out_features if hasattr(layer.mlp, "router") else None for layer in model.model.layers]
    assert counts == [2, None, 3, 3]
    assert model.model.layers[0].mlp.router.weight.shape == (2, 64)
    names = load_file(out / "model.safetensors")
    assert not any(name.startswith("model.layers.0.mlp.new_experts.1.") for name in names)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    reloaded = again.config
    assert (reloaded.num_experts, reloaded.moe_layers, reloaded.max_num_experts) == ([2, 3, 3], [0, 2, 3], 3)
    assert [reloaded.num_experts_of(i) for i in (0, 2, 3)] == [2, 3, 3]


def test_sharded_output_equals_the_unsharded_one_bit_for_bit(tiny_llama_dir, tmp_path):
    single = upcycle(tiny_llama_dir, tmp_path / "single", UpcycleSettings(num_experts=3, seed=4))
    sharded = upcycle(
        tiny_llama_dir, tmp_path / "sharded", UpcycleSettings(num_experts=3, seed=4, max_shard_size="100KB")
    )
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 5
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    single_model = AutoModelForCausalLM.from_pretrained(single)
    sharded_model = AutoModelForCausalLM.from_pretrained(sharded)
    single_state, sharded_state = single_model.state_dict(), sharded_model.state_dict()
    assert single_state.keys() == sharded_state.keys()
    assert all(torch.equal(single_state[name], sharded_state[name]) for name in single_state)
    assert (single / "config.json").read_text() == (sharded / "config.json").read_text()


def test_output_does_not_depend_on_how_the_dense_checkpoint_is_stored(tiny_llama_dir, tmp_path):
    dense = load_file(tiny_llama_dir / "model.safetensors")
    reordered = _copy_without_weights(tiny_llama_dir, tmp_path / "reordered")
    names = sorted(dense, reverse=True)
    writer = ShardedWriter(reordered, [TensorSpec(n, tuple(dense[n].shape), dense[n].dtype) for n in names], 50_000)
    for name in names:
        writer.write(name, dense[name])
    writer.finish()
    outputs = [upcycle(path, tmp_path / name, UpcycleSettings(num_experts=3, seed=9)) for name, path in
               (("from_single", tiny_llama_dir), ("from_reordered_shards", reordered))]
    first, second = (load_file(out / "model.safetensors") for out in outputs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_generation_config_and_chat_template_are_kept(tiny_llama_dir, tmp_path):
    dense = tmp_path / "dense"
    shutil.copytree(tiny_llama_dir, dense)
    generation = json.loads((dense / "generation_config.json").read_text())
    generation.update(do_sample=True, temperature=0.3, top_p=0.8, max_new_tokens=17)
    (dense / "generation_config.json").write_text(json.dumps(generation, indent=1))
    tokenizer = AutoTokenizer.from_pretrained(dense)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(dense)

    out = upcycle(dense, tmp_path / "moe")
    assert (out / "generation_config.json").read_bytes() == (dense / "generation_config.json").read_bytes()
    chat = AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<user>hi"
    assert AutoModelForCausalLM.from_pretrained(out).generation_config.temperature == 0.3


def test_tied_bf16_model_keeps_its_tied_embeddings_and_dtype(tmp_path):
    dense_dir = save_dense_model(tmp_path / "dense", dtype=torch.bfloat16, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(dense_dir / "model.safetensors")
    out = upcycle(dense_dir, tmp_path / "moe", UpcycleSettings(num_experts=3, top_k=2))
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    # The function is compared in float32: in bfloat16 the experts' weighted sum rounds differently from one FFN.
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    input_ids = torch.randint(2, dense.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (moe(input_ids=input_ids).logits - dense(input_ids=input_ids).logits).abs().max() <= 1e-5


def test_moect_method_writes_the_ffn_its_routed_copies_and_a_zero_fusion_layer(tiny_qwen2_dir, tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["--method", "moe_ct", "--model_path", str(tiny_qwen2_dir), "--output_path", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["moe_method"], config["num_experts"], config["num_experts_per_tok"]) == (
        "qwen2_moelpr", "ct", 2, 1
    )
    moe, dense = load_file(out / "model.safetensors"), load_file(tiny_qwen2_dir / "model.safetensors")
    for layer in range(4):
        prefix = f"model.layers.{layer}.mlp."
        for suffix in ("gate_proj", "up_proj", "down_proj"):
            original = dense[f"{prefix}{suffix}.weight"]
            for expert in ("original_expert", "new_experts.0", "new_experts.1"):
                assert torch.equal(moe[f"{prefix}{expert}.{suffix}.weight"], original)
        assert moe[f"{prefix}router.weight"].shape == (2, 64) and moe[f"{prefix}router.weight"].abs().max() > 0
        assert not moe[f"{prefix}fusion.weight"].any() and not moe[f"{prefix}fusion.bias"].any()
        assert moe[f"{prefix}fusion.weight"].shape == (2, 64) and f"{prefix}new_experts.2.up_proj.weight" not in moe

    # Per-layer counts: one routed expert is enough for MoE-CT.
    per_layer = upcycle(
        tiny_qwen2_dir, tmp_path / "ct_per_layer", UpcycleSettings(num_experts="0:1,2-3:2", method="moe_ct")
    )
    model = AutoModelForCausalLM.from_pretrained(per_layer)
    assert [len(layer.mlp.new_experts) if hasattr(layer.mlp, "new_experts") else None for layer in model.model.layers] == [
        1, None, 2, 2
    ]
