"""Both MoE-LPR stages through the real `llamafactory-cli train`, as a user runs them.

The CLI picks the plugin up through the .pth startup hook of the installed package
(`pip install -e .`), so these tests also prove that hook works, for torchrun workers too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from llamafactory_cli import CLI, REPO, train
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelpr.checkpoints.slim import ComposedCheckpoint
from moelpr.models import routing_stats

ROUTING_KEYS = {"lm_loss", "aux_loss", "lpr_loss", "old_lang_expert0_top1_share"}
ROUTING_KEYS |= {f"expert_share_{i}" for i in range(4)}

pytestmark = pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed")


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint; stage outputs are slim (docs/checkpoints.md), composed with their bases."""
    with ComposedCheckpoint(model_dir) as checkpoint:
        return {name: checkpoint.get(name) for name in checkpoint.names()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype for k in before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def routing_log(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "trainer_log.jsonl").read_text().splitlines()]


def old_language_expert0_share(model_dir: Path) -> float:
    """Share of old-language (English) tokens whose top-1 expert is expert 0, averaged over layers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in (REPO / "data" / "old_en.jsonl").read_text().splitlines()]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    mask = batch["attention_mask"]
    return routing_stats(out.router_logits, model.config.num_experts_per_tok, mask, mask)["old_lang_expert0_top1_share"]


def test_stage1_trains_exactly_the_new_experts_and_routers(stage_outputs):
    diff = changed(weights(stage_outputs["upcycled"]), weights(stage_outputs["stage1"]))
    assert all(".mlp.router." in k or ".mlp.new_experts." in k for k in diff), diff
    assert {k for k in diff if ".mlp.router." in k} == {f"model.layers.{i}.mlp.router.weight" for i in range(4)}
    assert any(".mlp.new_experts." in k for k in diff)
    config = json.loads((stage_outputs["stage1"] / "config.json").read_text())
    assert (config["model_type"], config["router_aux_loss_coef"], config["lpr_loss_coef"]) == ("llama_moelpr", 0.01, 0)


def test_stage2_trains_exactly_the_routers(stage_outputs):
    stage1, stage2 = weights(stage_outputs["stage1"]), weights(stage_outputs["stage2"])
    assert changed(stage1, stage2) == {f"model.layers.{i}.mlp.router.weight" for i in range(4)}
    upcycled = weights(stage_outputs["upcycled"])
    untouched = [k for k in upcycled if ".mlp.router." not in k and ".mlp.new_experts." not in k]
    assert untouched and all(torch.equal(upcycled[k], stage2[k]) for k in untouched)


def test_stage2_raises_the_old_language_expert0_share(stage_outputs):
    before = old_language_expert0_share(stage_outputs["stage1"])
    after = old_language_expert0_share(stage_outputs["stage2"])
    assert after > before + 0.15, (before, after)


def test_routing_statistics_are_logged_every_step(stage_outputs):
    for stage, steps in (("stage1", 4), ("stage2", 8)):
        out = stage_outputs[stage]
        logged = [entry for entry in routing_log(out) if "loss" in entry]
        assert [entry["current_steps"] for entry in logged] == list(range(1, steps + 1))
        expected = ROUTING_KEYS if stage == "stage2" else ROUTING_KEYS - {"old_lang_expert0_top1_share"}
        assert all(expected <= entry.keys() for entry in logged), logged[0]
        assert all(abs(sum(e[f"expert_share_{i}"] for i in range(4)) - 1) < 1e-3 for e in logged)
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        assert all(expected <= entry.keys() for entry in history if "loss" in entry)
        assert (out / "training_lpr_loss.png").is_file() and (out / "training_expert_share_0.png").is_file()
    stage2_log = [entry for entry in routing_log(stage_outputs["stage2"]) if "loss" in entry]
    assert stage2_log[-1]["lpr_loss"] < stage2_log[0]["lpr_loss"]


def test_stage1_on_a_model_with_per_layer_expert_counts(per_layer_llama_dir, tmp_path):
    out = train(
        tmp_path,
        "per_layer",
        model_name_or_path=str(per_layer_llama_dir),
        moelpr_stage="post_pretrain",
        dataset="new_hu",
        learning_rate=1e-3,
        max_steps=2,
    )
    diff = changed(weights(per_layer_llama_dir), weights(out))
    assert all(".mlp.router." in k or ".mlp.new_experts." in k for k in diff), diff
    assert {k for k in diff if ".mlp.router." in k} == {f"model.layers.{i}.mlp.router.weight" for i in (0, 2, 3)}
    assert json.loads((out / "config.json").read_text())["num_experts"] == [2, 3, 3]
    logged = [entry for entry in routing_log(out) if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:  # shares over the largest expert count; layer 0 has no expert 2 and counts 0 for it
        assert "expert_share_3" not in entry
        assert abs(sum(entry[f"expert_share_{i}"] for i in range(3)) - 1) < 1e-3, entry


def test_stage2_output_loads_in_llamafactory_chat(stage_outputs):
    """The startup hook registers the model types for LLaMA-Factory's inference commands too."""
    probe = (
        "from llamafactory.chat import ChatModel; "
        f"chat = ChatModel({{'model_name_or_path': {str(stage_outputs['stage2'])!r}, 'template': 'empty', "
        "'max_new_tokens': 3, 'do_sample': False}); "
        "chat.chat([{'role': 'user', 'content': 'hello'}]); print(type(chat.engine.model).__name__)"
    )
    run = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("LlamaMoELPRForCausalLM")


def test_resume_from_checkpoint_continues_the_run(stage_outputs, upcycled_llama_dir):
    stage1 = stage_outputs["stage1"]
    resumed = train(
        stage_outputs["tmp"],
        "stage1_resumed",
        model_name_or_path=str(upcycled_llama_dir),
        moelpr_stage="post_pretrain",
        dataset="new_hu,new_tr",
        learning_rate=1e-3,
        max_steps=4,
        resume_from_checkpoint=str(stage1 / "checkpoint-2"),
    )
    assert [e["current_steps"] for e in routing_log(resumed) if "loss" in e] == [3, 4]
    straight, continued = weights(stage1), weights(resumed)
    assert all(torch.allclose(straight[k], continued[k], atol=1e-6) for k in straight)


def test_two_process_torchrun_with_experts_that_get_no_token(upcycled_llama_dir, tmp_path):
    # Zero routers tie every expert, so top-2 picks the same two experts for every token on both ranks in
    # the first step: the other two, trainable new experts among them, get no token, which must not break
    # DDP's gradient reduction.
    start = tmp_path / "zero_routers"
    shutil.copytree(upcycled_llama_dir, start)
    tensors = weights(start)
    save_file(
        {k: torch.zeros_like(v) if ".mlp.router." in k else v for k, v in tensors.items()},
        start / "model.safetensors",
        metadata={"format": "pt"},
    )
    out = train(
        tmp_path,
        "ddp",
        env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"},
        model_name_or_path=str(start),
        moelpr_stage="post_pretrain",
        generate_lang_mask=True,
        dataset="new_hu,new_tr,old_en",
        learning_rate=1e-3,
        max_steps=2,
        per_device_train_batch_size=1,
    )
    diff = changed(weights(start), weights(out))
    assert diff and all(".mlp.router." in k or ".mlp.new_experts." in k for k in diff)
    logged = [entry for entry in routing_log(out) if "loss" in entry]
    assert len(logged) == 2 and all(ROUTING_KEYS - {"old_lang_expert0_top1_share"} <= e.keys() for e in logged)
    idle = [i for i in range(4) if logged[0][f"expert_share_{i}"] == 0]
    assert len(idle) == 2 and max(idle) >= 1, logged[0]


def test_bad_input_fails_before_training(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "dense.yaml"
    output_dir = tmp_path / "never"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_llama_dir),
                "stage": "pt",
                "do_train": True,
                "finetuning_type": "moelpr",
                "dataset": "new_hu",
                "dataset_dir": str(REPO / "data"),
                "output_dir": str(output_dir),
                "use_cpu": True,
            }
        )
    )
    run = subprocess.run([CLI, "train", str(recipe)], check=False, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0
    assert "[moelpr] error: `finetuning_type: moelpr` trains an upcycled MoE-LPR model" in run.stderr
    assert "Traceback" not in run.stderr  # a user mistake is one line, not a stack trace
    assert not (output_dir / "trainer_log.jsonl").exists()


def test_eval_loss_is_the_lm_loss_whatever_the_router_loss_weights(stage_outputs):
    """LLaMA-Factory's eval_loss and eval_perplexity measure the language model, not the router losses."""
    results = []
    for name, coefs in (("eval_plain", {"aux_loss_coef": 0.0, "lpr_loss_coef": 0.0}),
                        ("eval_heavy", {"aux_loss_coef": 10.0, "lpr_loss_coef": 10.0})):
        out = train(
            stage_outputs["tmp"],
            name,
            model_name_or_path=str(stage_outputs["stage2"]),
            moelpr_stage="review",
            generate_lang_mask=True,
            do_train=False,
            do_eval=True,
            dataset="new_hu,old_en",
            eval_dataset="old_en,new_hu",
            per_device_eval_batch_size=2,
            **coefs,
        )
        results.append(json.loads((out / "eval_results.json").read_text()))
    plain, heavy = results
    assert plain["eval_loss"] == pytest.approx(heavy["eval_loss"], rel=1e-6), (plain, heavy)
    assert plain["eval_perplexity"] == pytest.approx(heavy["eval_perplexity"], rel=1e-6)


def test_llamafactory_export_of_a_stage_output_loads_again(stage_outputs, tmp_path):
    """`llamafactory-cli export` rewrites the trained model as a checkpoint that loads again and computes the
    same logits; `moelpr export` turns the trained model into a Mixtral that computes them too."""
    recipe = {
        "model_name_or_path": str(stage_outputs["stage2"]),
        "template": "empty",
        "export_dir": str(tmp_path / "llamafactory_export"),
        "infer_dtype": "float32",  # LLaMA-Factory's default ("auto") would halve the precision
    }
    recipe_file = tmp_path / "export.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    run = subprocess.run([CLI, "export", str(recipe_file)], check=False, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    exported = Path(recipe["export_dir"])
    assert json.loads((exported / "config.json").read_text())["model_type"] == "llama_moelpr"
    assert not changed(weights(stage_outputs["stage2"]), weights(exported))

    from moelpr.export.transformers_moe import export

    mixtral = export(stage_outputs["stage2"], tmp_path / "mixtral")
    tokenizer = AutoTokenizer.from_pretrained(exported)
    batch = tokenizer(["Magyarul: a gyors barna róka", "The quick brown fox"], padding=True, return_tensors="pt")
    logits = {}
    for name, path in (("trained", stage_outputs["stage2"]), ("llamafactory", exported), ("mixtral", mixtral)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits[name] = model(**batch).logits[batch["attention_mask"].bool()]
    assert type(model).__name__ == "MixtralForCausalLM"
    assert torch.equal(logits["llamafactory"], logits["trained"])
    assert (logits["mixtral"] - logits["trained"]).abs().max() <= 1e-5


MOE_PARTS = ("router", "new_experts", "fusion")


def test_moect_trains_exactly_its_modules_and_logs_the_fusion_weights(moect_llama_dir, tmp_path):
    common = {
        "model_name_or_path": str(moect_llama_dir),
        "dataset": "new_hu,new_tr,old_en",
        "learning_rate": 1e-3,
        "max_steps": 3,
        "save_steps": 10,
    }
    out = train(tmp_path, "moect", moelpr_method="moe_ct", generate_lang_mask=True, **common)
    before = weights(Path(moect_llama_dir))
    diff = changed(before, weights(out))
    layers = range(4)
    trained = {f"model.layers.{i}.mlp.{part}.weight" for i in layers for part in ("router", "fusion")}
    trained |= {f"model.layers.{i}.mlp.fusion.bias" for i in layers}
    trained |= {"model.embed_tokens.weight", "lm_head.weight"}  # the tiny llama's embeddings are not tied
    assert trained <= diff and any(".mlp.new_experts." in k for k in diff)
    assert all(k in trained or ".mlp.new_experts." in k for k in diff), diff - trained
    config = json.loads((out / "config.json").read_text())
    assert (config["moe_method"], config["router_aux_loss_coef"], config["lpr_loss_coef"]) == ("ct", 0.01, 0)

    logged = [entry for entry in routing_log(out) if "loss" in entry]
    assert [entry["current_steps"] for entry in logged] == [1, 2, 3]
    for entry in logged:
        assert {"lm_loss", "aux_loss", "expert_share_0", "expert_share_1", "ffn_fusion_weight"} <= entry.keys()
        assert "lpr_loss" not in entry and "old_lang_expert0_top1_share" not in entry
        assert abs(entry["expert_share_0"] + entry["expert_share_1"] - 1) < 1e-3
        assert 0 < entry["ffn_fusion_weight"] < 1
    # The fusion layers start at zero (weight 1/2 on the frozen FFN for every token), then learn.
    assert logged[0]["ffn_fusion_weight"] == 0.5 and logged[-1]["ffn_fusion_weight"] != 0.5
    assert any("old_lang_ffn_fusion_weight" in e and "new_lang_ffn_fusion_weight" in e for e in logged)
    assert (out / "training_ffn_fusion_weight.png").is_file()

    frozen_embeddings = train(tmp_path, "moect_frozen_embeddings", moect_train_embeddings=False, **common)
    diff = changed(before, weights(frozen_embeddings))
    assert diff and all(any(f".mlp.{part}." in k for part in MOE_PARTS) for k in diff), diff
