"""``moelpr merge``: the command line of :func:`moelpr.checkpoints.merge.merge`."""

from __future__ import annotations

import argparse
import sys

from ..checkpoints.merge import merge
from ..checkpoints.streaming import DEFAULT_MAX_SHARD_SIZE
from .runner import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a slim moelpr checkpoint as a standalone whole checkpoint.")
    parser.add_argument("--model_path", required=True, help="the slim (or whole) checkpoint directory")
    parser.add_argument("--output_path", required=True, help="new directory for the whole checkpoint")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE, help="largest weight file (default 5GB)")
    return parser


def _merge(args: argparse.Namespace) -> None:
    out = merge(args.model_path, args.output_path, args.max_shard_size)
    print(f"Whole checkpoint written to {out}")


def main(argv: list[str] | None = None) -> int:
    return run_command("merge", build_parser(), _merge, argv)


if __name__ == "__main__":
    sys.exit(main())
