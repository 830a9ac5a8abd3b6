"""The families beyond LLaMA and Qwen2, end to end: each upcycled with per-layer expert counts, trained through
both stages of the real `llamafactory-cli train`, evaluated with `moelpr eval`, and exported or refused; and
Gemma 3 270M, a real pretrained base, upcycled and trained the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llamafactory_cli import REPO, train
from test_plugin_e2e import changed, routing_log, weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelpr.checkpoints.slim import ComposedCheckpoint
from moelpr.cli.eval import main as eval_main
from moelpr.cli.export import main as export_main
from moelpr.export.families import NO_STANDARD_FORMAT
from moelpr.models import MOE_FAMILIES
from moelpr.upcycling.settings import UpcycleSettings
from moelpr.upcycling.upcycle import upcycle

# LLaMA and Qwen2 go through the same steps in test_plugin_e2e.py, test_evaluation.py and test_export.py; a family
# added to MOE_FAMILIES (and to tiny_models.py) is tested here without further edits.
NEW_FAMILIES = sorted(set(MOE_FAMILIES) - {"llama", "qwen2"})
# Layer 0: 3 experts, layer 1 dense, layers 2-3: 2 experts.
PER_LAYER_SPEC, MOE_LAYERS, EXPERT_COUNTS = "0:3,2-3:2", [0, 2, 3], [3, 2, 2]


def _router_names(layers: list[int]) -> set[str]:
    return {f"model.layers.{i}.mlp.router.weight" for i in layers}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_per_layer_moe_trains_both_stages_evaluates_and_exports_or_refuses(family, tiny_dense_dir, tmp_path, capsys):
    dense = tiny_dense_dir(family)
    upcycled = upcycle(dense, tmp_path / "upcycled", UpcycleSettings(num_experts=PER_LAYER_SPEC, top_k=2))
    common = {"learning_rate": 1e-2, "max_steps": 2, "gradient_accumulation_steps": 1, "save_strategy": "no"}
    stage1 = train(tmp_path, "stage1", model_name_or_path=str(upcycled), moelpr_stage="post_pretrain",
                   dataset="new_hu", **common)
    stage2 = train(tmp_path, "stage2", model_name_or_path=str(stage1), moelpr_stage="review",
                   generate_lang_mask=True, dataset="new_hu,old_en", mix_strategy="interleave_under",
                   interleave_probs="0.5,0.5", **common)

    before, after1, after2 = weights(upcycled), weights(stage1), weights(stage2)
    stage1_changed = changed(before, after1)
    assert {k for k in stage1_changed if ".mlp.router." in k} == _router_names(MOE_LAYERS)
    assert any(".mlp.new_experts." in k for k in stage1_changed)
    assert all(".mlp.router." in k or ".mlp.new_experts." in k for k in stage1_changed), stage1_changed
    assert changed(after1, after2) == _router_names(MOE_LAYERS)
    config = json.loads((stage2 / "config.json").read_text())
    assert (config["model_type"], config["moe_layers"], config["num_experts"]) == (
        f"{family}_moelpr", MOE_LAYERS, EXPERT_COUNTS
    )
    for stage, out in (("stage1", stage1), ("stage2", stage2)):
        logged = [entry for entry in routing_log(out) if "loss" in entry]
        assert [entry["current_steps"] for entry in logged] == [1, 2], stage
        assert all(abs(sum(entry[f"expert_share_{i}"] for i in range(3)) - 1) < 1e-3 for entry in logged), stage
    assert all(entry["lpr_loss"] > 0 for entry in routing_log(stage2) if "loss" in entry)

    report = tmp_path / "report"
    argv = ["--model", f"dense={dense}", "--model", f"upcycled={upcycled}", "--model", f"stage2={stage2}",
            "--heldout", f"en={REPO / 'data' / 'old_en.jsonl'}", "--heldout", f"hu={REPO / 'data' / 'new_hu.jsonl'}",
            "--old_languages", "en", "--output_dir", str(report), "--cutoff_len", "16", "--max_tokens", "48"]
    assert eval_main(argv) == 0
    perplexity = json.loads((report / "perplexity.json").read_text())["models"]
    for lang in ("en", "hu"):
        # The upcycled model computes the dense function; training moved the stage-2 model away from it.
        assert perplexity["upcycled"]["languages"][lang]["perplexity"] == pytest.approx(
            perplexity["dense"]["languages"][lang]["perplexity"], rel=1e-4
        )
        assert perplexity["stage2"]["languages"][lang]["perplexity"] != pytest.approx(
            perplexity["dense"]["languages"][lang]["perplexity"], rel=1e-4
        )
    routing = json.loads((report / "routing.json").read_text())["stage2"]
    assert (routing["layers"], routing["num_experts"]) == (MOE_LAYERS, EXPERT_COUNTS)

    capsys.readouterr()
    assert export_main(["--model_path", str(stage2), "--output_path", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    # No standard format holds per-layer expert counts, nor any Gemma 3 model.
    reason = NO_STANDARD_FORMAT.get(family, "different expert counts [3, 2, 2]")
    assert err.startswith("moelpr export: error: ") and "\n" not in err and reason in err, err
    assert not (tmp_path / "export").exists()


def _changed_tensors(before_dir: Path, after_dir: Path) -> set[str]:
    """Names of the tensors that differ between two checkpoints, read one tensor at a time (a 1.6 GB model); stage
    outputs are slim, composed with their bases."""
    with ComposedCheckpoint(before_dir) as before, ComposedCheckpoint(after_dir) as after:
        assert sorted(before.names()) == sorted(after.names())
        return {name for name in before.names() if not torch.equal(before.get(name), after.get(name))}


GEMMA3_TEXTS = [
    "The Eiffel Tower is located in the city of Paris, which is the capital of France.",
    "Az árvíztűrő tükörfúrógép minden ékezetes magyar magánhangzót tartalmaz.",
    "Pijamalı hasta yağız şoföre çabucak güvendi.",
]


def test_gemma3_270m_upcycles_to_the_dense_function_and_trains_both_stages(gemma3_dense_dir, tmp_path):
    # Every layer upcycled: layers 0-8 with 2 experts, layers 9-17 with 4.
    upcycled = upcycle(gemma3_dense_dir, tmp_path / "upcycled", UpcycleSettings(num_experts="0-8:2,9-17:4", top_k=2))
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dense_dir)
    batch = tokenizer(GEMMA3_TEXTS, padding=True, return_tensors="pt")  # padded: the short texts end in <pad>
    real = batch["attention_mask"].bool()
    logits = {}
    for name, path, dtype in (("dense", gemma3_dense_dir, torch.float32), ("dense_fp64", gemma3_dense_dir, torch.float64),
                              ("upcycled", upcycled, torch.float32)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():
            logits[name] = model(**batch).logits[real].double()
        del model
    # The upcycled model differs from the dense one by float32 rounding (expert outputs summed with weights that
    # add up to 1 in float32), no more than the dense model's own float32 result differs from its float64 one.
    upcycling_error = (logits["upcycled"] - logits["dense"]).abs().max().item()
    rounding_error = (logits["dense"] - logits["dense_fp64"]).abs().max().item()
    assert upcycling_error <= 2 * rounding_error, (upcycling_error, rounding_error)

    common = {"learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": 1,
              "gradient_accumulation_steps": 1, "save_strategy": "no"}
    stage1 = train(tmp_path, "stage1", model_name_or_path=str(upcycled), moelpr_stage="post_pretrain",
                   dataset="new_hu", **common)
    stage2 = train(tmp_path, "stage2", model_name_or_path=str(stage1), moelpr_stage="review",
                   generate_lang_mask=True, dataset="new_hu,old_en", mix_strategy="interleave_under",
                   interleave_probs="0.5,0.5", **common)
    routers = {f"model.layers.{i}.mlp.router.weight" for i in range(18)}
    stage1_changed = _changed_tensors(upcycled, stage1)
    assert {name for name in stage1_changed if ".mlp.router." in name} == routers
    assert any(".mlp.new_experts." in name for name in stage1_changed)
    assert all(".mlp.router." in name or ".mlp.new_experts." in name for name in stage1_changed), stage1_changed
    assert _changed_tensors(stage1, stage2) == routers
    for out in (stage1, stage2):
        logged = [entry for entry in routing_log(out) if "loss" in entry]
        assert [entry["current_steps"] for entry in logged] == [1, 2]
        assert all(0 < entry["lm_loss"] < 20 for entry in logged), logged
    assert not (stage1 / "chat_template.jinja").exists()  # the base has no chat template; stage 2 could read it
