"""``moelpr expand``: the command line of :func:`moelpr.upcycling.llama_pro.expand` (LLaMA-Pro block expansion)."""

from __future__ import annotations

import argparse
import sys

from ..upcycling.llama_pro import FAMILIES, expand
from .runner import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelpr expand",
        description="LLaMA-Pro block expansion: insert N identity-initialised copies of decoder blocks, one after "
        "each group of L/N layers, for LLaMA-Factory's `use_llama_pro` freeze training.",
    )
    parser.add_argument(
        "--model_path", required=True, help=f"dense HF checkpoint directory ({', '.join(sorted(FAMILIES))})"
    )
    parser.add_argument("--output_path", required=True, help="new directory for the expanded checkpoint")
    parser.add_argument("--num_expand", type=int, required=True, help="blocks to add; must divide the layer count")
    parser.add_argument("--max_shard_size", default="5GB", help="largest weight file written (default 5GB)")
    return parser


def _expand(args: argparse.Namespace) -> None:
    out = expand(args.model_path, args.output_path, args.num_expand, args.max_shard_size)
    print(f"Expanded checkpoint written to {out}. Train only the new blocks with LLaMA-Factory:")
    print(f"  model_name_or_path: {out}\n  finetuning_type: freeze\n  use_llama_pro: true")
    print(f"  freeze_trainable_layers: {args.num_expand}")


def main(argv: list[str] | None = None) -> int:
    return run_command("expand", build_parser(), _expand, argv)


if __name__ == "__main__":
    sys.exit(main())
