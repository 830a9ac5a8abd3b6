"""benchmarks/gpu_suite.sh in its tiny CPU form, so that the GPU suite (run by hand where a GPU is lent) cannot rot:
every part runs and leaves its results under $OUT."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from llamafactory_cli import CLI, REPO

pytestmark = pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed")


def test_gpu_suite_cpu_form_runs_every_part(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu-tiny"],
        env={**os.environ, "OUT": str(out), "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, summary + run.stderr[-3000:]
    for part in ("models", "step_time", "sync_check", "train_plain", "freeze_plain", "inference_auto"):
        assert f"{part}: ok" in summary, summary

    steps = json.loads((out / "step_time.json").read_text())
    runs = {(r["run"], r["dtype"]) for r in steps}
    for dtype in ("bf16", "float32"):
        assert ("dense full fine-tuning", dtype) in runs
        for stage in ("stage1", "stage2"):
            assert {(f"MoE-LPR {stage}, {impl}", dtype) for impl in ("loop", "grouped")} <= runs
    assert all(r["seconds_per_step"] > 0 and r["ratio_to_dense"] > 0 for r in steps)

    assert json.loads((out / "sync_check.json").read_text())["checked"] is False  # no GPU here: said, not faked
    freeze = json.loads((out / "freeze_plain.json").read_text())
    assert freeze["freeze_rules_hold"] and freeze["stage2_changed"] == freeze["routers"] > 0, freeze
    inference = json.loads((out / "inference_auto.json").read_text())
    assert inference["prefill_ratio_moe_to_dense"] > 0 and inference["decode_ratio_moe_to_dense"] > 0
    assert not list(tmp_path.glob("moelpr-gpu-suite.*"))  # the suite's working directory is removed
