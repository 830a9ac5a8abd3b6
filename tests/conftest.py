import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_dense_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_dense_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return save_dense_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def upcycled_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    from moelpr.upcycling import upcycle

    return upcycle(tiny_llama_dir, tmp_path_factory.mktemp("upcycled") / "moe", num_experts=4, top_k=2)


@pytest.fixture(scope="session")
def per_layer_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """Upcycled with different expert counts per layer (layer 1 stays dense)."""
    from moelpr.upcycling import upcycle

    return upcycle(tiny_llama_dir, tmp_path_factory.mktemp("per_layer") / "moe", num_experts="0:2,2-3:3", top_k=2)
