"""``moelpr env``: what a problem report needs to know of this environment, as ``llamafactory-cli env`` prints it.

Versions come from the installed packages' metadata, so DeepSpeed, lm-eval and llama-cpp-python are not imported
(each takes seconds, and a broken one would hide the rest of the report); torch is imported for the device.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import site
import sys
from collections.abc import Sequence
from pathlib import Path

from ..extras import EXTRAS, missing_packages

# (label, distribution) of every package whose version the report gives.
PACKAGES = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("llamafactory", "llamafactory"),
    ("peft", "peft"),
    ("deepspeed", "deepspeed"),
    ("lm-eval", "lm-eval"),
    ("llama-cpp-python", "llama-cpp-python"),
)
STARTUP_HOOK_FILE = "moelpr-startup.pth"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _extras() -> list[str]:
    lines = []
    for extra in EXTRAS:
        missing = missing_packages(extra)
        lines.append(f"{extra}: " + (f"missing {', '.join(missing)}" if missing else "installed"))
    return lines


def _startup_hook() -> str:
    """Where the .pth that loads the startup hook lies, and whether this interpreter ran it."""
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    files = [str(Path(d) / STARTUP_HOOK_FILE) for d in site_dirs if (Path(d) / STARTUP_HOOK_FILE).is_file()]
    if not files:
        return f"not installed (no {STARTUP_HOOK_FILE} in {', '.join(site_dirs)})"
    loaded = "loaded" if "_moelpr_startup_hook" in sys.modules else "not loaded by this interpreter"
    return f"installed ({', '.join(files)}), {loaded}"


def _plugin() -> str:
    """Whether ``llamafactory-cli train`` would apply the plugin (the startup hook's own decision)."""
    try:
        from _moelpr_startup_hook import plugin_releases, releases_outside_plugin_ranges
    except ImportError:
        return "would not apply: the startup hook is not installed"
    outside = releases_outside_plugin_ranges()
    if outside:
        return f"off ({', '.join(outside)} installed; it supports {plugin_releases()})"
    return f"applies ({plugin_releases()})"


def _avx512_bf16() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    return "yes" if "avx512_bf16" in cpuinfo.split() else "no"


def _grouped_experts(torch, device: str) -> str:
    """Run one tiny MoE-LPR layer with its experts forced to the grouped GEMM, in bf16 on ``device``: whether it
    runs, not just whether it should."""
    from ..models import LlamaMoELPRConfig, LlamaMoELPRForCausalLM

    config = LlamaMoELPRConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=2,
        num_experts_per_tok=1,
        moe_experts_implementation="grouped",
    )
    try:
        model = LlamaMoELPRForCausalLM(config).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            model(input_ids=torch.arange(8, device=device).unsqueeze(0))
    except Exception as error:  # noqa: BLE001 - any failure is the answer; its first line says which
        return f"no ({type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]})"
    return "yes"


def _device() -> list[str]:
    try:
        import torch
    except ImportError as error:
        return [f"device: unknown (torch does not import: {error})"]
    lines = [f"torch CUDA build: {torch.version.cuda or 'none (CPU build)'}"]
    if not torch.cuda.is_available():
        return [
            *lines,
            "device: CPU",
            f"CPU AVX512-BF16: {_avx512_bf16()}",
            "grouped-GEMM experts: not used on CPU (moe_experts_implementation 'auto' runs the loop there)",
        ]
    count = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    bf16 = torch.cuda.is_bf16_supported()
    grouped = _grouped_experts(torch, "cuda:0")
    if grouped == "yes":
        grouped += (
            " ('auto' uses them in bf16)" if (major, minor) >= (8, 0) else " ('auto' needs compute capability 8.0)"
        )
    return [
        *lines,
        f"device: GPU, {count} x {name}, compute capability {major}.{minor}",
        f"bf16: {'yes' if bf16 else 'no'}",
        f"grouped-GEMM experts: {grouped}",
    ]


def report() -> list[str]:
    """The lines ``moelpr env`` prints."""
    package_dir = Path(__file__).resolve().parents[1]
    lines = [f"platform: {platform.platform()}", f"Python: {platform.python_version()}"]
    lines.append(f"moelpr: {_version('moelpr')} ({package_dir})")
    lines += [f"{label}: {_version(distribution)}" for label, distribution in PACKAGES]
    lines += [f"extra {line}" for line in _extras()]
    lines += [f"startup hook: {_startup_hook()}", f"LLaMA-Factory plugin: {_plugin()}"]
    lines += _device()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moelpr env", description="Print the versions, extras, plugin state and device; paste it into a report."
    )
    parser.parse_args(argv)
    print("\n".join(f"- {line}" for line in report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
