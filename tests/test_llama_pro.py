"""LLaMA-Pro block expansion: the expanded model computes the dense function, its new blocks sit where
LLaMA-Factory's `use_llama_pro` trains, and `llamafactory-cli` then trains exactly them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from llamafactory.hparams import FinetuningArguments
from llamafactory.model.adapter import _setup_freeze_tuning
from safetensors.torch import load_file
from test_plugin_e2e import changed, train, weights
from tiny_models import save_dense_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from moelpr.checkpoints.streaming import CheckpointReader
from moelpr.cli import main as moelpr_main
from moelpr.upcycling.llama_pro import FAMILIES, expand, expansion_plan

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Magyarul: a gyors barna róka."]


def _logits_and_greedy_tokens(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        # Decoding with the KV cache also checks that every layer, new ones included, keeps its own cache slot.
        tokens = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return logits * batch["attention_mask"][..., None], tokens


def _new_block_indices(num_layers: int, num_expand: int) -> set[int]:
    return {i for i, (_, new) in enumerate(expansion_plan(num_layers, num_expand)) if new}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_expanded_model_computes_the_dense_function(family, tied, tmp_path):
    dense_dir = save_dense_model(tmp_path / "dense", family, tie_word_embeddings=tied)
    assert moelpr_main(["expand", "--model_path", str(dense_dir), "--output_path", str(tmp_path / "pro"),
                        "--num_expand", "2"]) == 0
    pro_dir = tmp_path / "pro"

    dense_logits, dense_tokens = _logits_and_greedy_tokens(dense_dir)
    pro_logits, pro_tokens = _logits_and_greedy_tokens(pro_dir)
    assert (dense_logits - pro_logits).abs().max() <= 1e-5
    assert torch.equal(dense_tokens, pro_tokens)

    config = json.loads((pro_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["tie_word_embeddings"]) == (family, 6, tied)
    assert {p.name for p in dense_dir.iterdir()} == {p.name for p in pro_dir.iterdir()}

    dense, pro = weights(dense_dir), weights(pro_dir)
    assert ("lm_head.weight" in pro) == (not tied)
    # Dense layers 0, 1 | new copy of 1 | dense layers 2, 3 | new copy of 3.
    sources = {0: 0, 1: 1, 2: 1, 3: 2, 4: 3, 5: 3}
    assert len(pro) == len(dense) + 2 * sum(k.startswith("model.layers.0.") for k in dense)
    for name, tensor in pro.items():
        if not name.startswith("model.layers."):
            assert torch.equal(tensor, dense[name]), name
            continue
        index, suffix = name.removeprefix("model.layers.").split(".", 1)
        original = dense[f"model.layers.{sources[int(index)]}.{suffix}"]
        if int(index) in (2, 5) and suffix.split(".")[1] in ("o_proj", "down_proj"):
            assert not tensor.any() and tensor.shape == original.shape, name
        else:
            assert torch.equal(tensor, original), name


def test_sliding_window_layers_keep_their_kind(tmp_path):
    # Layers 2 and 3 of the dense model attend within a window shorter than the test sentences.
    dense_dir = save_dense_model(
        tmp_path / "dense", "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2
    )
    expand(dense_dir, tmp_path / "pro", num_expand=2)
    config = json.loads((tmp_path / "pro" / "config.json").read_text())
    full, sliding = "full_attention", "sliding_attention"
    assert config["layer_types"] == [full, full, full, sliding, sliding, sliding]
    # max_window_layers, from which transformers derives layer_types when they are absent, says the same.
    del config["layer_types"]
    assert AutoConfig.for_model(**config).layer_types == [full, full, full, sliding, sliding, sliding]
    dense_logits, _ = _logits_and_greedy_tokens(dense_dir)
    pro_logits, _ = _logits_and_greedy_tokens(tmp_path / "pro")
    assert (dense_logits - pro_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("layer_types_in_config", [True, False], ids=["layer_types", "sliding_window_pattern"])
def test_gemma3_new_blocks_take_their_source_layers_attention_kind(layer_types_in_config, tmp_path):
    # Layers 0 and 2 of the tiny Gemma 3 attend within a window shorter than the test sentences. Older Gemma 3
    # checkpoints give only the pattern (every second layer global here), from which the new blocks would not follow.
    dense_dir = save_dense_model(tmp_path / "dense", "gemma3_text")
    config = json.loads((dense_dir / "config.json").read_text())
    assert config["sliding_window_pattern"] == 2
    if not layer_types_in_config:
        del config["layer_types"]
        (dense_dir / "config.json").write_text(json.dumps(config))
    expand(dense_dir, tmp_path / "pro", num_expand=2)
    full, sliding = "full_attention", "sliding_attention"
    assert json.loads((tmp_path / "pro" / "config.json").read_text())["layer_types"] == [
        sliding, full, full, sliding, full, full
    ]
    dense_logits, dense_tokens = _logits_and_greedy_tokens(dense_dir)
    pro_logits, pro_tokens = _logits_and_greedy_tokens(tmp_path / "pro")
    assert (dense_logits - pro_logits).abs().max() <= 1e-5
    assert torch.equal(dense_tokens, pro_tokens)


@pytest.mark.parametrize("num_layers,num_expand", [(4, 1), (4, 2), (4, 4), (6, 3), (30, 6)])
def test_new_blocks_sit_where_use_llama_pro_trains(num_layers, num_expand):
    """LLaMA-Factory's own freeze rule, run on a model of the expanded depth, trains exactly the new blocks."""
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=16, num_hidden_layers=num_layers + num_expand)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    args = FinetuningArguments(finetuning_type="freeze", use_llama_pro=True, freeze_trainable_layers=num_expand)
    _setup_freeze_tuning(model, args, is_trainable=True, cast_trainable_params_to_fp32=False)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {int(name.split(".")[2]) for name in trainable} == _new_block_indices(num_layers, num_expand)
    assert all(name.startswith("model.layers.") for name in trainable)


def test_llamafactory_trains_exactly_the_new_blocks(tiny_llama_dir, tmp_path):
    pro_dir = expand(tiny_llama_dir, tmp_path / "pro", num_expand=2)
    trained = train(
        tmp_path,
        "llama_pro",
        model_name_or_path=str(pro_dir),
        finetuning_type="freeze",
        use_llama_pro=True,
        freeze_trainable_layers=2,
        dataset="new_hu",
        learning_rate=1e-3,
        max_steps=3,
        save_steps=3,
    )
    before, after = weights(pro_dir), weights(trained)
    new_blocks = {name for name in before if name.startswith(("model.layers.2.", "model.layers.5."))}
    # The zeroed projections move in step 1; the rest of a new block gets gradients once they are non-zero.
    assert changed(before, after) == new_blocks


def test_large_models_are_written_in_shards(tiny_llama_dir, tmp_path):
    whole = load_file(expand(tiny_llama_dir, tmp_path / "whole", num_expand=4) / "model.safetensors")
    sharded = expand(tiny_llama_dir, tmp_path / "sharded", num_expand=4, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    with CheckpointReader(sharded) as reader:
        assert sorted(reader.names()) == sorted(whole)
        assert all(torch.equal(reader.get(name), tensor) for name, tensor in whole.items())


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("zero", ["--num_expand", "0"], "--num_expand must be at least 1, got 0"),
        ("not a divisor", ["--num_expand", "3"], "does not divide the model's 4 layers into equal groups; "
                                                 "choose one of 1, 2, 4"),
        ("unsupported", ["--model_path", "{gpt2}"], "cannot expand model_type 'gpt2'"),
        ("missing path", ["--model_path", "{missing}"], "is not a model directory"),
        ("no tokenizer", ["--model_path", "{no_tokenizer}"], "has no tokenizer files"),
        ("no weights", ["--model_path", "{no_weights}"], "has no model.safetensors"),
        ("weights disagree", ["--model_path", "{six_layers}"], "the weights hold layers 0..3 (4 in all), but "
                                                               "config.json says num_hidden_layers = 6"),
        ("output exists", ["--output_path", "{dense}"], "already exists and is not empty"),
        ("already upcycled", ["--model_path", "{upcycled}"], "is an upcycled MoE-LPR model (llama_moelpr)"),
    ],
)
def test_bad_requests_get_one_clear_line_and_write_nothing(
    case, args, message, tiny_llama_dir, upcycled_llama_dir, tmp_path, capsys
):
    paths = {"missing": tmp_path / "nope", "dense": tiny_llama_dir, "upcycled": upcycled_llama_dir}
    for name, files in (("gpt2", ["tokenizer.json"]), ("no_tokenizer", []), ("no_weights", ["tokenizer.json"])):
        paths[name] = tmp_path / name
        paths[name].mkdir()
        for file in ["config.json", *files]:
            shutil.copy(tiny_llama_dir / file, paths[name] / file)
    (paths["gpt2"] / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    paths["six_layers"] = tmp_path / "six_layers"
    shutil.copytree(tiny_llama_dir, paths["six_layers"])
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (paths["six_layers"] / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    argv = {"--model_path": str(tiny_llama_dir), "--output_path": str(tmp_path / "out"), "--num_expand": "2"}
    for key, value in zip(args[::2], args[1::2]):
        argv[key] = value.format(**paths)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert moelpr_main(["expand", *[item for pair in argv.items() for item in pair]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
