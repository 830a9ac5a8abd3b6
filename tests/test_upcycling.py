"""The upcycling command: what it writes, and the one-line errors for requests it cannot serve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelpr.upcycling import main, parse_layers

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


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("unsupported", ["--model_path", "{gpt2}"], "cannot upcycle model_type 'gpt2'"),
        ("one expert", ["--num_experts", "1"], "--num_experts must be at least 2"),
        ("topk too large", ["--num_experts", "2", "--topk", "3"], "--topk must be between 1 and --num_experts (2)"),
        ("missing path", ["--model_path", "{missing}"], "is not a model directory"),
        ("no tokenizer", ["--model_path", "{no_tokenizer}"], "has no tokenizer files"),
        ("bad layers", ["--moe_layers", "0,9"], "names layers outside 0..3"),
        ("output holds a model", ["--output_path", "{dense}"], "already holds a model"),
        ("already upcycled", ["--model_path", "{upcycled}"], "already an upcycled MoE-LPR model"),
    ],
)
def test_bad_requests_get_one_clear_line_and_write_nothing(
    case, args, message, tiny_llama_dir, upcycled_llama_dir, tmp_path, capsys
):
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", no_tokenizer / "config.json")
    paths = {"gpt2": _gpt2_dir(tmp_path), "missing": tmp_path / "nope", "dense": tiny_llama_dir,
             "upcycled": upcycled_llama_dir, "no_tokenizer": no_tokenizer}
    argv = {"--model_path": str(tiny_llama_dir), "--output_path": str(tmp_path / "out")}
    for key, value in zip(args[::2], args[1::2]):
        argv[key] = value.format(**paths)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([item for pair in argv.items() for item in pair]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_layer_specs():
    assert parse_layers(None, 6) is None
    assert parse_layers("all", 6) is None
    assert parse_layers("every:2", 6) == [0, 2, 4]
    assert parse_layers("5,0-2", 6) == [0, 1, 2, 5]


def test_console_command_is_installed():
    result = subprocess.run(["moelpr", "upcycle", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--num_experts" in result.stdout
