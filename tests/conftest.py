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
def moect_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    from tiny_models import save_moect_model

    return save_moect_model(tiny_llama_dir, tmp_path_factory.mktemp("moect") / "moe")
