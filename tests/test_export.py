"""`moelpr export`: MoE-LPR checkpoints as standard Mixtral / Qwen2-MoE / Qwen3-MoE checkpoints that plain
transformers loads, in a process that never imports moelpr, and that compute the native model's logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_dense_model
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from moelpr.checkpoints.streaming import CheckpointReader
from moelpr.cli.export import main
from moelpr.export.families import EXPORT_FAMILIES
from moelpr.export.qwen2_moe import ZERO_SHARED_EXPERT_SIZE
from moelpr.upcycling.settings import UpcycleSettings
from moelpr.upcycling.upcycle import upcycle

NUM_LAYERS, NUM_EXPERTS, MOE_LAYERS, DENSE_LAYERS = 4, 4, (0, 2), (1, 3)
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Magyarul: a gyors barna róka"]

# name: (dense family, tied embeddings, top-k, --format (None: the family's default), --max_shard_size, config
# fields of the dense model beyond tiny_models.py's)
CASES = {
    "llama-mixtral-top2": ("llama", False, 2, None, None, {}),
    "llama-mixtral-tied-top1": ("llama", True, 1, "mixtral", None, {}),
    "llama-qwen2_moe-top2-sharded": ("llama", False, 2, "qwen2_moe", "40KB", {}),
    "qwen2-qwen2_moe-top1": ("qwen2", False, 1, None, None, {}),
    "qwen2-qwen2_moe-tied-top2": ("qwen2", True, 2, None, None, {}),
    # Qwen3's head_dim (32) is not hidden / heads (16), as in the released Qwen3 models.
    "qwen3-qwen3_moe-top2": ("qwen3", False, 2, None, None, {}),
    "qwen3-qwen3_moe-tied-top1": ("qwen3", True, 1, None, None, {}),
    # A window as long as the positions is carried over (head_dim 32 as Mistral NeMo's); Qwen2-MoE needs
    # head_dim = hidden / heads.
    "mistral-mixtral-top2": ("mistral", False, 2, None, None, {"sliding_window": 512}),
    "mistral-qwen2_moe-top1": ("mistral", False, 1, "qwen2_moe", None, {"sliding_window": None, "head_dim": None}),
}
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# Runs with plain transformers only; prints what it loaded and how far its logits are from the native ones.
LOAD_EXPORTS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

report = {}
for name, case in json.loads(sys.argv[1]).items():
    model, info = AutoModelForCausalLM.from_pretrained(case["export"], output_loading_info=True)
    native = torch.load(case["native"])
    with torch.no_grad():
        logits = model.eval()(input_ids=native["input_ids"], attention_mask=native["attention_mask"]).logits
    real = native["attention_mask"].bool()
    report[name] = {
        "class": type(model).__name__,
        "dtype": str(model.dtype),
        "max_abs_diff": (logits[real] - native["logits"][real]).abs().max().item(),
        "loading_problems": [str(k) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
                             for k in info.get(key, [])],
        "chat_template": AutoTokenizer.from_pretrained(case["export"]).chat_template,
        "eos_token_id": GenerationConfig.from_pretrained(case["export"]).eos_token_id,
    }
report["moelpr_modules"] = sorted(m for m in sys.modules if m == "moelpr" or m.startswith("moelpr."))
print(json.dumps(report))
"""


def _make_routing_matter(model_dir: Path, seed: int) -> None:
    """Random routers large enough to route tokens differently, and new experts that differ from the
    original FFN, so that the export only matches if it routes and weighs exactly as MoE-LPR does."""
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(model_dir / "model.safetensors")
    for name, tensor in tensors.items():
        if ".mlp.router." in name:
            tensors[name] = torch.randn(tensor.shape, generator=generator) * 2.0
        elif ".mlp.new_experts." in name:
            tensors[name] = tensor + torch.randn(tensor.shape, generator=generator) * tensor.std()
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def _source_model(root: Path, family: str, tied: bool, top_k: int, seed: int, config_fields: dict) -> Path:
    dense = save_dense_model(
        root / "dense", family, num_layers=NUM_LAYERS, seed=seed, tie_word_embeddings=tied, **config_fields
    )
    tokenizer = AutoTokenizer.from_pretrained(dense)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(dense)
    moe = upcycle(
        dense, root / "moelpr", UpcycleSettings(num_experts=NUM_EXPERTS, top_k=top_k, moe_layers=list(MOE_LAYERS))
    )
    _make_routing_matter(moe, seed)
    return moe


def _native_logits(model_dir: Path, out_file: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = AutoTokenizer.from_pretrained(model_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    for router_logits in out.router_logits:  # routing matters: tokens go to different experts in every layer
        assert router_logits.argmax(dim=-1).unique().numel() >= 2
    torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": out.logits},
               out_file)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict]:
    exported = {}
    for seed, (name, (family, tied, top_k, fmt, shard, config_fields)) in enumerate(CASES.items()):
        root = tmp_path_factory.mktemp(name)
        source = _source_model(root, family, tied, top_k, seed, config_fields)
        _native_logits(source, root / "native.pt")
        args = ["--model_path", str(source), "--output_path", str(root / "export")]
        args += ["--format", fmt] if fmt else []
        args += ["--max_shard_size", shard] if shard else []
        assert main(args) == 0
        exported[name] = {"source": source, "export": root / "export", "native": root / "native.pt",
                          "family": family, "tied": tied, "format": fmt or EXPORT_FAMILIES[family].formats[0]}
    return exported


@pytest.fixture(scope="module")
def loaded_by_plain_transformers(exports) -> dict:
    cases = {name: {"export": str(c["export"]), "native": str(c["native"])} for name, c in exports.items()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not even this checkout on the path
    run = subprocess.run([sys.executable, "-c", LOAD_EXPORTS, json.dumps(cases)], capture_output=True, text=True,
                         env=env, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_plain_transformers_computes_the_native_logits(exports, loaded_by_plain_transformers):
    report = loaded_by_plain_transformers
    assert report.pop("moelpr_modules") == []
    for name, case in exports.items():
        result = report[name]
        expected = (ARCHITECTURES[case["format"]], "torch.float32", [])
        assert (result["class"], result["dtype"], result["loading_problems"]) == expected, name
        assert result["max_abs_diff"] <= 1e-5, (name, result["max_abs_diff"])
        assert result["chat_template"] == CHAT_TEMPLATE
        assert result["eos_token_id"] == 0


def _public_names(fmt: str, tied: bool) -> set[str]:
    """Tensor names of the public Mixtral-8x7B / Qwen1.5-MoE-A2.7B / Qwen3-30B-A3B checkpoints, for this model's
    shape."""
    names = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    for i in range(NUM_LAYERS):
        layer = f"model.layers.{i}"
        names |= {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"}
        names |= {f"{layer}.self_attn.{p}_proj.weight" for p in "qkvo"}
        if fmt == "qwen3_moe":
            names |= {f"{layer}.self_attn.q_norm.weight", f"{layer}.self_attn.k_norm.weight"}
        if fmt == "mixtral":
            names.add(f"{layer}.block_sparse_moe.gate.weight")
            names |= {f"{layer}.block_sparse_moe.experts.{j}.{w}.weight" for j in range(NUM_EXPERTS)
                      for w in ("w1", "w2", "w3")}
            continue
        if fmt == "qwen2_moe":
            names |= {f"{layer}.self_attn.{p}_proj.bias" for p in "qkv"}
        if i in DENSE_LAYERS:
            names |= {f"{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
            continue
        names.add(f"{layer}.mlp.gate.weight")
        if fmt == "qwen2_moe":
            names.add(f"{layer}.mlp.shared_expert_gate.weight")
            names |= {f"{layer}.mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")}
        names |= {f"{layer}.mlp.experts.{j}.{p}_proj.weight" for j in range(NUM_EXPERTS) for p in ("gate", "up", "down")}
    return names


def _export_tensors(export_dir: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(export_dir) as reader:
        return {name: reader.get(name) for name in reader.names()}


def test_tensors_carry_the_public_checkpoints_names(exports):
    for name, case in exports.items():
        assert set(_export_tensors(case["export"])) == _public_names(case["format"], case["tied"]), name
    sharded = exports["llama-qwen2_moe-top2-sharded"]["export"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()


def test_dense_layers_and_the_shared_expert_compute_what_moelpr_does(exports):
    case = exports["llama-mixtral-top2"]
    source, exported = load_file(case["source"] / "model.safetensors"), _export_tensors(case["export"])
    for i in DENSE_LAYERS:  # Mixtral has no dense layer: equal experts under a zero router
        assert not exported[f"model.layers.{i}.block_sparse_moe.gate.weight"].any()
        for j in range(NUM_EXPERTS):
            for ours, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                assert torch.equal(exported[f"model.layers.{i}.block_sparse_moe.experts.{j}.{theirs}.weight"],
                                   source[f"model.layers.{i}.mlp.{ours}.weight"])
    exported = _export_tensors(exports["llama-qwen2_moe-top2-sharded"]["export"])
    shared = {k: v for k, v in exported.items() if "shared_expert" in k or "_proj.bias" in k}
    assert shared and not any(v.any() for v in shared.values())  # Llama has no q/k/v biases: zeros
    assert exported["model.layers.0.mlp.shared_expert.down_proj.weight"].shape == (64, ZERO_SHARED_EXPERT_SIZE)


def test_config_is_a_plain_target_config(exports):
    legacy_keys = {"rope_theta", "rope_scaling", "torch_dtype"}  # read by engines on transformers 4
    standard_keys = {"architectures", "dtype"}  # written when set, absent from a default config
    # Qwen3-MoE keys of the public checkpoints that transformers 5's default config lacks: its name for
    # num_local_experts, and head_dim (read with getattr, absent from the default).
    public_keys = {"num_experts", "head_dim"}
    for name, case in exports.items():
        config = json.loads((case["export"] / "config.json").read_text())
        config_class = {"mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig}[case["format"]]
        default_keys = set(json.loads(config_class().to_json_string()))
        assert set(config) <= default_keys | legacy_keys | standard_keys | public_keys
        assert config["model_type"] == case["format"]
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
        assert config["tie_word_embeddings"] is case["tied"]
        if case["format"] in ("qwen2_moe", "qwen3_moe"):
            assert (config["mlp_only_layers"], config["norm_topk_prob"]) == (list(DENSE_LAYERS), True)
        if case["format"] == "qwen3_moe":
            assert (config["num_experts"], config["head_dim"]) == (NUM_EXPERTS, 32)
            assert "num_local_experts" not in config
        if name == "mistral-mixtral-top2":
            assert (config["head_dim"], config["sliding_window"]) == (32, 512)
        for sidecar in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            assert (case["export"] / sidecar).read_bytes() == (case["source"] / sidecar).read_bytes()


def _edited_copy(source: Path, target: Path, **config_changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


REFUSALS = {
    # name: (source case, config changes, extra arguments, expected part of the one-line reason)
    "per-layer expert counts": ("llama-mixtral-top2", {"num_experts": [4, 3]}, [], "different expert counts [4, 3]"),
    "another MoE method": ("llama-mixtral-top2", {"moe_method": "ct"}, [], "moe_method 'ct' has no standard"),
    "attention biases": ("llama-mixtral-top2", {"attention_bias": True}, [], "attention_bias is set"),
    "non-SiLU activation": ("llama-mixtral-top2", {"hidden_act": "gelu"}, [], "hidden_act is 'gelu'"),
    "head_dim Qwen2-MoE cannot hold": ("llama-mixtral-top2", {"head_dim": 32}, ["--format", "qwen2_moe"],
                                       "head_dim 32 is not hidden_size / num_attention_heads"),
    "Qwen2 as Mixtral": ("qwen2-qwen2_moe-top1", {}, ["--format", "mixtral"], "Mixtral's attention has no q/k/v biases"),
    "sliding window": ("qwen2-qwen2_moe-top1", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
                       [], "sliding-window attention"),
    "Qwen3 as Mixtral": ("qwen3-qwen3_moe-top2", {}, ["--format", "mixtral"], "Mixtral's attention has no q/k norms"),
    "Qwen3 sliding window": ("qwen3-qwen3_moe-top2", {"use_sliding_window": True, "sliding_window": 8},
                             [], "sliding-window attention, which vLLM's and llama.cpp's Qwen3-MoE"),
    "Qwen3 attention biases": ("qwen3-qwen3_moe-top2", {"attention_bias": True}, [], "Qwen3-MoE has no o_proj bias"),
    "Mistral window": ("mistral-mixtral-top2", {"sliding_window": 8}, [],
                       "sliding_window 8 is shorter than max_position_embeddings 512"),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(refusal, exports, tmp_path, capsys):
    case, changes, extra, reason = REFUSALS[refusal]
    source = _edited_copy(exports[case]["source"], tmp_path / "source", **changes)
    out = tmp_path / "out" / "export"
    assert main(["--model_path", str(source), "--output_path", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelpr export: error: ") and "\n" not in err and reason in err, err
    assert not out.parent.exists()


def test_a_dense_model_or_an_occupied_output_is_refused(tiny_llama_dir, exports, tmp_path, capsys):
    assert main(["--model_path", str(tiny_llama_dir), "--output_path", str(tmp_path / "out")]) == 2
    assert "is not an MoE-LPR checkpoint (model_type 'llama')" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["--model_path", str(exports["llama-mixtral-top2"]["source"]), "--output_path", str(occupied)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["occupied"] and [p.name for p in occupied.iterdir()] == ["notes.txt"]


def test_a_missing_shard_leaves_nothing(exports, tmp_path, capsys):
    source = tmp_path / "sharded_source"
    AutoModelForCausalLM.from_pretrained(exports["llama-mixtral-top2"]["source"]).save_pretrained(
        source, max_shard_size="100KB"
    )
    shutil.copy(exports["llama-mixtral-top2"]["source"] / "tokenizer.json", source)
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[-1].unlink()  # listed in the index
    out = tmp_path / "out" / "export"
    assert main(["--model_path", str(source), "--output_path", str(out)]) == 2
    assert f"{shards[-1]}, listed in model.safetensors.index.json, is missing" in capsys.readouterr().err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
