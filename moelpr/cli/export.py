"""``moelpr export``: the command line of :mod:`moelpr.export` (a standard MoE checkpoint, or a GGUF file)."""

from __future__ import annotations

import argparse
import sys

from ..export.families import EXPORT_FAMILIES
from ..export.gguf import OUTTYPES, plan_gguf, write_gguf
from ..export.transformers_moe import FORMATS, describe, plan_export, write_export
from .runner import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelpr export",
        description="Export an MoE-LPR checkpoint as a standard Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint, or as a "
        "GGUF file for llama.cpp (see docs/export.md).",
    )
    parser.add_argument("--model_path", required=True, help="MoE-LPR checkpoint directory (upcycled or trained)")
    parser.add_argument(
        "--output_path", required=True, help="new directory for the exported checkpoint (a new .gguf file for gguf)"
    )
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
    return parser


def _export(args: argparse.Namespace) -> None:
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
