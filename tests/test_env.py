"""`moelpr env` reports the installed versions, extras, plugin state and device without importing the extras."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import torch
from test_plugin_releases import reported_as

PROBE = (
    "import sys; sys.modules.update(dict.fromkeys(sys.argv[1:])); from moelpr.cli import main; code = main(['env']); "
    "print('imported:', [m for m in ('deepspeed', 'lm_eval', 'llama_cpp') if sys.modules.get(m)]); sys.exit(code)"
)


def moelpr_env(tmp_path, hidden: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict[str, str]:
    """`moelpr env`'s report, with the ``hidden`` modules made unimportable."""
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *hidden],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    *lines, imported = run.stdout.strip().splitlines()
    assert imported == "imported: []"  # versions come from metadata: DeepSpeed, lm-eval, llama.cpp stay unimported
    assert all(line.startswith("- ") for line in lines)
    return dict(line[2:].split(": ", 1) for line in lines)


def test_env_reports_the_versions_extras_plugin_and_device(tmp_path):
    report = moelpr_env(tmp_path)
    assert report["Python"] == ".".join(map(str, sys.version_info[:3]))
    for package in ("torch", "transformers", "llamafactory", "peft", "deepspeed", "lm-eval", "llama-cpp-python"):
        assert report[package] == importlib.metadata.version(package)
    assert report["moelpr"].startswith(importlib.metadata.version("moelpr") + " (")
    assert {key: report[key] for key in report if key.startswith("extra ")} == {
        "extra eval": "installed",
        "extra gguf": "installed",
        "extra deepspeed": "installed",
    }
    assert report["startup hook"].startswith("installed (") and report["startup hook"].endswith(
        "moelpr-startup.pth), loaded"
    )
    assert report["LLaMA-Factory plugin"] == "applies (llamafactory>=0.9.5,<0.9.6 with transformers>=5.6,<5.7)"
    if torch.cuda.is_available():
        assert report["device"].startswith("GPU, ") and report["grouped-GEMM experts"].startswith(("yes", "no"))
    else:
        assert report["device"] == "CPU" and report["CPU AVX512-BF16"] in ("yes", "no")


def test_env_reports_a_missing_extra_and_the_plugin_off(tmp_path):
    report = moelpr_env(tmp_path, hidden=("lm_eval", "sacrebleu"), env=reported_as(tmp_path, "llamafactory", "0.9.99"))
    assert report["extra eval"] == "missing lm-eval, sacrebleu" and report["extra gguf"] == "installed"
    assert report["llamafactory"] == "0.9.99"
    assert report["LLaMA-Factory plugin"] == (
        "off (llamafactory 0.9.99 installed; it supports llamafactory>=0.9.5,<0.9.6 with transformers>=5.6,<5.7)"
    )
