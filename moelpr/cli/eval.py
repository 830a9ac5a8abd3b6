"""``moelpr eval``: per-language held-out perplexity of one or more models, the routing report of the
MoE ones, and the loss curves of training runs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..checkpoints.model_dir import require_model_dir
from .runner import UsageError, run_command

EXAMPLE = (
    "example: moelpr eval --model base=work/models/base --model moe=saves/stage2 "
    "--heldout hu=work/corpora/hu_heldout.jsonl --heldout en=work/corpora/en_heldout.jsonl "
    "--old_languages en --output_dir work/eval"
)


def _pairs(values: Sequence[str], option: str, what: str) -> dict[str, Path]:
    pairs: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{option} expects {what}=PATH, got {value!r}")
        if name in pairs:
            raise UsageError(f"{option}: {what} {name!r} is given twice")
        pairs[name] = Path(path)
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelpr eval", description=__doc__, epilog=EXAMPLE)
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a checkpoint directory (dense or MoE-LPR); repeat for several; the first is the baseline of the relative table",
    )
    parser.add_argument(
        "--heldout",
        action="append",
        required=True,
        metavar="LANG=FILE",
        help='held-out jsonl file of one language (one {"text": ...} per line); repeat per language',
    )
    parser.add_argument(
        "--old_languages",
        default="",
        metavar="LANG[,LANG]",
        help="comma-separated languages (as named in --heldout) the base model already knew; the rest are new",
    )
    parser.add_argument(
        "--run_dir",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LLaMA-Factory output directory whose trainer_state.json goes into loss_curves.png; repeatable",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--cutoff_len", type=int, default=256, help="tokens per evaluated block (default: 256)")
    parser.add_argument(
        "--max_tokens",
        type=int,
        default=None,
        help="evaluate at most this many tokens per language, spread over its documents: each gives "
        "at most max(cutoff_len, max_tokens / 20) tokens, more where too few documents fill less",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--bf16", action="store_true", help="run the models in bfloat16 (faster on CPUs with AVX512-BF16)"
    )
    parser.add_argument("--text_field", default="text", help="jsonl field holding the text (default: text)")
    return parser


def _validated(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Path], set[str], dict[str, Path]]:
    models = _pairs(args.model, "--model", "NAME")
    heldout = _pairs(args.heldout, "--heldout", "LANG")
    runs = _pairs(args.run_dir, "--run_dir", "NAME")
    for name, path in models.items():
        require_model_dir(path, f"--model {name}:")
    for lang, path in heldout.items():
        if not path.is_file():
            raise UsageError(f"--heldout {lang}: file not found: {path}")
    for name, path in runs.items():
        if not path.is_dir():
            raise UsageError(f"--run_dir {name}: directory not found: {path}")
    old = {lang.strip() for lang in args.old_languages.split(",") if lang.strip()}
    unknown = sorted(old - set(heldout))
    if unknown:
        raise UsageError(f"--old_languages names {', '.join(unknown)}, which no --heldout gives")
    if args.cutoff_len < 2:
        raise UsageError("--cutoff_len must be at least 2")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UsageError("--max_tokens must be at least 2")
    return models, heldout, old, runs


def _eval(args: argparse.Namespace) -> None:
    models, heldout, old, runs = _validated(args)
    logging.basicConfig(level=logging.INFO, format="[moelpr.eval] %(message)s")

    import torch

    from ..evaluation.report import evaluate

    evaluate(
        models,
        heldout,
        old,
        args.output_dir,
        cutoff_len=args.cutoff_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        runs=runs,
        text_field=args.text_field,
    )
    print((args.output_dir / "perplexity.md").read_text())
    print(f"Report written to {args.output_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("eval", build_parser(), _eval, argv)


if __name__ == "__main__":
    sys.exit(main())
