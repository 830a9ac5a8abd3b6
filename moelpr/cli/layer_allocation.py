"""``python -m moelpr.cli.layer_allocation``: how ``--num_experts auto:K`` would spread K new experts over a dense
model's layers (:mod:`moelpr.upcycling.layer_allocation`), without upcycling anything."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..upcycling.layer_allocation import (
    ALLOCATION_FILE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_TOKENS,
    allocate_for_checkpoint,
    parse_auto_budget,
    write_allocation,
)
from .runner import UsageError, run_command


def split_paths(value: str) -> list[Path]:
    return [Path(p) for p in value.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moelpr.cli.layer_allocation",
        description="Show how --num_experts auto:K would spread K new experts over a dense model's layers "
        "(LayerMoE: fewer where old and new languages' FFN inputs are alike). Nothing is upcycled.",
    )
    parser.add_argument("--model_path", required=True, help="dense HF checkpoint directory")
    parser.add_argument("--num_experts", required=True, help="auto:K, K = new experts to spread over the layers")
    parser.add_argument(
        "--new_corpus", type=split_paths, default=[], help="new-language jsonl file(s), comma-separated"
    )
    parser.add_argument(
        "--old_corpus", type=split_paths, default=[], help="old-language jsonl file(s), comma-separated"
    )
    parser.add_argument(
        "--max_tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"tokens measured per corpus, from its start (default {DEFAULT_MAX_TOKENS:,}; the authors: 100,000)",
    )
    parser.add_argument(
        "--max_length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help=f"each document is cut to this many tokens (default {DEFAULT_MAX_LENGTH})",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="documents per forward pass")
    parser.add_argument("--text_field", default="text", help="jsonl field holding the text (default: text)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...)")
    parser.add_argument(
        "--output_dir", type=Path, default=None, help=f"also write {ALLOCATION_FILE} into this directory"
    )
    return parser


def _allocate(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    budget = parse_auto_budget(args.num_experts)
    if budget is None:
        raise UsageError(f"--num_experts must be auto:K here, got {args.num_experts!r}.")
    allocation = allocate_for_checkpoint(
        args.model_path,
        budget,
        args.new_corpus,
        args.old_corpus,
        device=args.device,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        batch_size=args.batch_size,
        text_field=args.text_field,
    )
    print(allocation.table())
    tokens = ", ".join(f"{name} {info['tokens']:,}" for name, info in allocation.corpora.items())
    print(f"\nTokens measured: {tokens}; {time.perf_counter() - start:.0f} s in all.")
    print(f"MoE layers: {len(allocation.moe_layers)} of {len(allocation.new_experts)}; --num_experts {allocation.spec}")
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        print(f"Written: {write_allocation(allocation, args.output_dir)}")


def main(argv: list[str] | None = None) -> int:
    return run_command("layer_allocation", build_parser(), _allocate, argv)


if __name__ == "__main__":
    sys.exit(main())
