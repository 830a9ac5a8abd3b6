"""The startup hook makes transformers' Auto classes open MoE-LPR checkpoints in any fresh interpreter.

Every probe runs in a new `python -c` that never imports moelpr, as a user's script or another tool would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moelpr.upcycling.settings import UpcycleSettings
from moelpr.upcycling.upcycle import upcycle


def run_fresh(probe: str) -> str:
    run = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip()


@pytest.fixture(params=["llama", "qwen2"])
def native_checkpoint(request, upcycled_llama_dir, tiny_qwen2_dir, tmp_path) -> tuple[Path, str]:
    if request.param == "llama":
        return upcycled_llama_dir, "LlamaMoELPR"
    return upcycle(tiny_qwen2_dir, tmp_path / "moe", UpcycleSettings(num_experts=4, top_k=2)), "Qwen2MoELPR"


def test_fresh_interpreter_opens_a_native_checkpoint_through_the_auto_classes(native_checkpoint):
    model_dir, family = native_checkpoint
    probe = (
        "import sys; from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline; "
        "print('moelpr' in sys.modules); "
        f"config = AutoConfig.from_pretrained({str(model_dir)!r}); "
        f"model, info = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, output_loading_info=True); "
        f"tokenizer = AutoTokenizer.from_pretrained({str(model_dir)!r}); "
        f"generator = pipeline('text-generation', model={str(model_dir)!r}); "
        "print(type(config).__name__, type(model).__name__, type(generator.model).__name__); "
        "print(sorted(k for k, v in info.items() if v), len(tokenizer('hello').input_ids) > 0)"
    )
    assert run_fresh(probe).splitlines() == [
        "False",
        f"{family}Config {family}ForCausalLM {family}ForCausalLM",
        "[] True",
    ]


def test_only_a_moelpr_model_type_imports_moelpr():
    """Other model types load as before; any *_moelpr type, known to moelpr or not, imports it first."""
    probe = (
        "import sys; from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
        "print('llama' in CONFIG_MAPPING, CONFIG_MAPPING['qwen2'].__name__, 'moelpr' in sys.modules); "
        "print('unknown_family_moelpr' in CONFIG_MAPPING, 'moelpr' in sys.modules, CONFIG_MAPPING['llama_moelpr'].__name__)"
    )
    assert run_fresh(probe).splitlines() == ["True Qwen2Config False", "False True LlamaMoELPRConfig"]
