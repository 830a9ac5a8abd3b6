"""Export an MoE-LPR checkpoint as one GGUF file that llama.cpp (and Ollama, LM Studio) runs, made by llama.cpp's own
converter.

The path: the standard MoE checkpoint of :mod:`moelpr.export.transformers_moe` (Mixtral for LLaMA and Mistral,
Qwen3-MoE for Qwen3) is written to a temporary directory, ``convert_hf_to_gguf.py`` turns it into a GGUF
(``f32``, ``f16``, ``bf16``, ``q8_0``), and for k-quants (``q4_k_m``, ...) llama.cpp's ``llama_model_quantize``, through
the llama-cpp-python binding, quantizes the f32 GGUF. The file appears whole or not at all.

The converter is not copied into moelpr: it ships inside the llama-cpp-python sdist (``vendor/llama.cpp``:
``convert_hf_to_gguf.py``, its ``conversion/`` package and its own ``gguf-py``), pinned to the version whose
engine ``requirements.txt`` installs. ``pip download`` fetches that sdist once into a cache directory (pip's own
HTTP cache usually holds it already, from building the wheel) and the three converter paths are unpacked there;
the converter runs as a subprocess with the sdist's ``gguf-py`` first on its path, as it arranges itself.

Only exports that llama.cpp computes as the MoE-LPR model does are written (see docs/export.md, "GGUF"):
llama.cpp's Qwen2-MoE graph does not renormalise the top-k weights and needs a shared expert and a router in
every layer, so Qwen2-family models are refused; its Qwen3-MoE graph renormalises (as the export's
``norm_topk_prob: true`` says) but has no dense layers, so Qwen3 models with dense layers are refused.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..extras import require
from .families import EXPORT_FAMILIES
from .format import ExportError
from .transformers_moe import ExportPlan, plan_export, write_export

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the pin in requirements.txt: converter and engine of one llama.cpp commit
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
# What the converter needs from the sdist's vendor/llama.cpp.
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
CONVERTER_DIR_ENV = "MOELPR_LLAMA_CPP_CONVERTER"  # an unpacked vendor/llama.cpp to use instead of the cache
PIP_DOWNLOAD = f"pip download --no-binary :all: --no-deps llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"

CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# k-quants llama_model_quantize makes from the f32 GGUF -> llama_ftype (llama.h: LLAMA_FTYPE_MOSTLY_*).
K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
OUTTYPES = (*CONVERTER_OUTTYPES, *K_QUANTS)

# Dense family -> the transformers export llama.cpp computes exactly, or why none does.
GGUF_ROUTES: dict[str, str] = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe"}
NO_GGUF_ROUTE = {
    "qwen2": (
        "llama.cpp's Qwen2-MoE does not renormalise the top-k router weights (build_moe_ffn with norm_w = false) "
        "and needs a router and a shared expert in every layer, so it would compute another model; serve the "
        "Qwen2-MoE export with vLLM instead"
    ),
}


def plan_gguf(model_path: str | os.PathLike) -> ExportPlan:
    """Check that ``model_path`` has a transformers export llama.cpp computes exactly; raises :class:`ExportError`
    with the reason otherwise. Reads only the config."""
    plan = plan_export(model_path)  # refuses what no format holds, with the family's reason
    dense_type = next(dense for dense, family in EXPORT_FAMILIES.items() if family is plan.family)
    if dense_type in NO_GGUF_ROUTE:
        raise ExportError(f"cannot export {model_path} as GGUF: {NO_GGUF_ROUTE[dense_type]}")
    plan = plan_export(model_path, GGUF_ROUTES[dense_type])
    if plan.target.name == "qwen3_moe" and plan.dense_layers:
        raise ExportError(
            f"cannot export {model_path} as GGUF: llama.cpp's Qwen3-MoE has a router in every layer and no dense "
            f"layers, and layers {plan.dense_layers} are dense; upcycle with every layer MoE (--moe_layers all)"
        )
    return plan


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moelpr"


def converter_dir() -> Path:
    """The directory holding llama.cpp's ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/`` of the pinned
    llama-cpp-python sdist: ``$MOELPR_LLAMA_CPP_CONVERTER``, else a cache filled once from ``pip download``."""
    if os.environ.get(CONVERTER_DIR_ENV):
        path = Path(os.environ[CONVERTER_DIR_ENV])
        if not all((path / name).exists() for name in CONVERTER_PATHS):
            raise ExportError(f"${CONVERTER_DIR_ENV}={path} does not hold {', '.join(CONVERTER_PATHS)}")
        return path
    cached = _cache_root() / f"{SDIST_NAME}-converter"
    if all((cached / name).exists() for name in CONVERTER_PATHS):
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llama-cpp-sdist.", dir=cached.parent) as tmp:
        download = subprocess.run(
            [sys.executable, "-m", *PIP_DOWNLOAD.split(), "-d", tmp, "-q"],
            capture_output=True,
            text=True,
            check=False,
        )
        sdists = list(Path(tmp).glob(f"{SDIST_NAME}.tar.gz"))
        if download.returncode != 0 or not sdists:
            reason = (download.stderr.strip().splitlines() or ["no sdist"])[-1]
            raise ExportError(
                f"llama.cpp's converter is not cached in {cached} and `{PIP_DOWNLOAD}` failed ({reason}); run it "
                f"where PyPI is reachable, or set ${CONVERTER_DIR_ENV} to an unpacked sdist's vendor/llama.cpp"
            )
        staging = Path(tmp) / "converter"
        prefix = f"{SDIST_NAME}/vendor/llama.cpp/"
        with tarfile.open(sdists[0]) as sdist:
            members = [
                m
                for m in sdist.getmembers()
                if m.name.startswith(prefix)
                and m.name[len(prefix) :].split("/")[0] in CONVERTER_PATHS
                and (m.isfile() or m.isdir())
            ]
            for member in members:
                member.name = member.name[len(prefix) :]
            sdist.extractall(staging, members=members, filter="data")
        shutil.rmtree(cached, ignore_errors=True)
        staging.rename(cached)
    return cached


def _quantize(source: Path, target: Path, outtype: str) -> None:
    import llama_cpp  # write_gguf has checked that it is installed

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[outtype]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise ExportError(f"llama.cpp's llama_model_quantize failed to make {outtype} from {source.name}")


def _check_engine_version() -> None:
    """The converter and the engine must come from one llama.cpp commit: the GGUF keys one writes, the other reads."""
    try:
        installed = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return  # converting needs only the sdist; running the file is up to the user's engine
    if installed != LLAMA_CPP_PYTHON_VERSION:
        raise ExportError(
            f"llama-cpp-python {installed} is installed, and moelpr's GGUF export is pinned to "
            f"{LLAMA_CPP_PYTHON_VERSION}: pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
        )


def export_gguf(model_path: str | os.PathLike, output_path: str | os.PathLike, outtype: str = "f16") -> Path:
    """Write the MoE-LPR model at ``model_path`` as a GGUF file ``output_path`` of ``outtype`` (one of
    :data:`OUTTYPES`); refuses with :class:`ExportError` before anything heavy runs when llama.cpp would compute
    another model."""
    return write_gguf(plan_gguf(model_path), output_path, outtype)


def write_gguf(plan: ExportPlan, output_path: str | os.PathLike, outtype: str) -> Path:
    """Write the checked GGUF export ``plan`` (see :func:`export_gguf`)."""
    output_path = Path(output_path)
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if output_path.suffix != ".gguf":
        raise ExportError(f"--output_path {output_path} should be a .gguf file")
    if output_path.exists():
        raise ExportError(f"--output_path {output_path} exists; choose a new file")
    if outtype in K_QUANTS:  # llama.cpp's quantizer, through its Python binding
        require("gguf", "llama_cpp", purpose=f"--outtype {outtype}")
    _check_engine_version()
    converter = converter_dir()

    created_parent = not output_path.parent.exists()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Beside the output, so the final rename stays on one file system and is atomic.
        with tempfile.TemporaryDirectory(prefix=f".{output_path.name}.", dir=output_path.parent) as tmp:
            checkpoint = write_export(plan, Path(tmp) / "checkpoint", "5GB")
            converted = Path(tmp) / "converted.gguf"
            convert_outtype = "f32" if outtype in K_QUANTS else outtype
            print(f"Converting with llama.cpp's convert_hf_to_gguf.py --outtype {convert_outtype}", file=sys.stderr)
            run = subprocess.run(
                [
                    sys.executable,
                    str(converter / "convert_hf_to_gguf.py"),
                    str(checkpoint),
                    "--outfile",
                    str(converted),
                    "--outtype",
                    convert_outtype,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if run.returncode != 0 or not converted.is_file():
                last = (run.stderr.strip().splitlines() or ["no output"])[-1]
                raise ExportError(f"llama.cpp's convert_hf_to_gguf.py failed: {last}")
            shutil.rmtree(checkpoint)  # the float checkpoint is no longer needed; free its disk before quantizing
            if outtype in K_QUANTS:
                quantized = Path(tmp) / "quantized.gguf"
                _quantize(converted, quantized, outtype)
                converted = quantized
            converted.chmod(0o666 & ~_umask())
            os.replace(converted, output_path)
    except BaseException:
        if created_parent and output_path.parent.is_dir() and not any(output_path.parent.iterdir()):
            output_path.parent.rmdir()
        raise
    return output_path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
