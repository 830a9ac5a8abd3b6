"""``moelpr export``: the command line of :mod:`moelpr.export` (a standard MoE checkpoint, or a GGUF file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..export.families import EXPORT_FAMILIES
from ..export.gguf import (
    CONVERTER_DIR_ENV,
    LLAMA_CPP_PYTHON_VERSION,
    OUTTYPES,
    PREPARE_OPTION,
    SDIST_NAME,
    default_converter_dir,
    holds_converter,
    plan_gguf,
    prepare_converter,
    write_gguf,
)
from ..export.transformers_moe import FORMATS, describe, plan_export, write_export
from .runner import UsageError, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelpr export",
        description="Export an MoE-LPR checkpoint as a standard Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint, or as a "
        "GGUF file for llama.cpp (see docs/export.md).",
    )
    parser.add_argument("--model_path", help="MoE-LPR checkpoint (upcycled or trained): a directory or a Hub id")
    parser.add_argument("--output_path", help="new directory for the exported checkpoint (a new .gguf file for gguf)")
    parser.add_argument(
        "--format",
        choices=[*sorted(FORMATS), "gguf"],
        default=None,
        help="target architecture (default by family: "
        + ", ".join(f"{family} -> {spec.formats[0]}" for family, spec in EXPORT_FAMILIES.items())
        + "); gguf: one GGUF file made by llama.cpp's converter",
    )
    parser.add_argument("--max_shard_size", default="5GB", help="largest weight shard, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument(
        "--outtype",
        choices=OUTTYPES,
        default="f16",
        help="with --format gguf: the GGUF's weight type (default: f16); k-quants are made from the f32 GGUF by "
        "llama.cpp's quantizer",
    )
    parser.add_argument(
        PREPARE_OPTION,
        nargs="?",
        type=Path,
        const=default_converter_dir(),
        default=None,
        metavar="DIR",
        help="instead of exporting: put llama.cpp's converter for --format gguf into DIR (default: the cache the "
        f"export reads, {default_converter_dir()}), downloading it with pip; then on a machine without a package "
        f"index, ${CONVERTER_DIR_ENV}=DIR lets the export run there",
    )
    parser.add_argument(
        "--sdist",
        type=Path,
        default=None,
        help=f"with {PREPARE_OPTION}: unpack this {SDIST_NAME}.tar.gz (from `pip download`) instead of downloading it",
    )
    return parser


def _prepare(target: Path, sdist: Path | None) -> None:
    if holds_converter(target):
        print(f"llama.cpp's converter is already in {target}")
    else:
        prepare_converter(target, sdist)
        print(f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) is now in {target}")
    if target != default_converter_dir():
        print(f"Export with it: {CONVERTER_DIR_ENV}={target} moelpr export --format gguf ...")


def _export(args: argparse.Namespace) -> None:
    if args.prepare_gguf_converter is not None:
        if args.model_path or args.output_path:
            raise UsageError(f"{PREPARE_OPTION} exports nothing; leave out --model_path and --output_path")
        _prepare(args.prepare_gguf_converter, args.sdist)
        return
    if args.sdist is not None:
        raise UsageError(f"--sdist is read only with {PREPARE_OPTION}")
    if not args.model_path or not args.output_path:
        raise UsageError(f"--model_path and --output_path are required (or {PREPARE_OPTION} alone)")
    if args.format == "gguf":
        plan = plan_gguf(args.model_path)
        out = write_gguf(plan, args.output_path, args.outtype)
        print(f"Exported {describe(plan)}\nas GGUF ({args.outtype}) to {out}")
        return
    plan = plan_export(args.model_path, args.format)
    out = write_export(plan, args.output_path, args.max_shard_size)
    print(f"Exported {describe(plan)}\nto {out}")


def main(argv: list[str] | None = None) -> int:
    return run_command("export", build_parser(), _export, argv)


if __name__ == "__main__":
    sys.exit(main())
