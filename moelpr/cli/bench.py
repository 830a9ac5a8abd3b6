"""``moelpr bench``: the MoE-LPR paper's accuracy table (its Table 1) for a model, with lm-eval 0.4.13.

The command line of :mod:`moelpr.evaluation.bench`, which describes what is measured and how it is laid out.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ..checkpoints.model_dir import require_model_dir
from ..evaluation.bench import BASELINE, GROUPS, BenchSettings, score_models
from ..evaluation.bench_report import write_report
from ..evaluation.lm_eval_tasks import MAX_GENERATED_TOKENS
from ..extras import require
from .runner import UsageError, run_command

EXAMPLE = (
    "example: moelpr bench --model_path saves/moelpr/stage2 --baseline work/models/base --new hu,tr,el "
    "--old en,es,zh --output_dir work/bench"
)


def _codes(value: str) -> list[str]:
    return [code.strip() for code in value.split(",") if code.strip()]


def _named_path(value: str) -> tuple[str, Path]:
    name, separator, path = value.rpartition("=")
    return (name, Path(path)) if separator and name else ("model", Path(value))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelpr bench", description=__doc__.split("\n\n")[0], epilog=EXAMPLE)
    parser.add_argument(
        "--model_path",
        type=_named_path,
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="a checkpoint to evaluate; repeat as NAME=PATH for several (one table, the baseline evaluated once)",
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="a checkpoint to compare with (e.g. the base model)"
    )
    parser.add_argument("--new", type=_codes, default=_codes("hu,tr,el"), help="expanded languages (default hu,tr,el)")
    parser.add_argument("--old", type=_codes, default=_codes("en,es,zh"), help="original languages (default en,es,zh)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument(
        "--flores_dir",
        type=Path,
        default=None,
        help="a FLORES-200 directory (dev/, devtest/); default: FLORES+ from the HF datasets cache",
    )
    parser.add_argument(
        "--helppage_tasks",
        type=Path,
        default=None,
        help="the task folder `python -m moelpr_lab.corpora --lm_eval_tasks` wrote (CORPORA/lm_eval_tasks)",
    )
    parser.add_argument(
        "--task_map",
        type=Path,
        default=None,
        help="JSON {benchmark: {label, shots, metric, tasks: {lang: task}}} replacing the paper's "
        "benchmarks (with --include_path for task files of your own)",
    )
    parser.add_argument("--include_path", type=Path, action="append", default=[], help="more lm-eval task folders")
    parser.add_argument(
        "--benchmarks",
        type=_codes,
        default=list(GROUPS),
        help="which to run, from paper (ARC, HellaSwag, MMLU, Belebele or --task_map's), flores, "
        "helppages (with --helppage_tasks); default: all",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="score only the first N documents of each task (the table says so)"
    )
    parser.add_argument(
        "--max_gen_toks",
        type=int,
        default=None,
        help=f"cap on the tokens generated per translation (default {MAX_GENERATED_TOKENS})",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", default="8")
    parser.add_argument("--dtype", default="float32", help="torch dtype of the models (bfloat16 on GPUs)")
    return parser


def _validated(args: argparse.Namespace) -> dict | None:
    for option, path in (*(("--model_path", p) for _, p in args.model_path), ("--baseline", args.baseline)):
        if path is not None:
            require_model_dir(path, f"{option}:")
    names = [name for name, _ in args.model_path]
    odd = [name for name in names if not re.fullmatch(r"[\w.-]+", name)]
    if odd:
        raise UsageError(f"--model_path: name {odd[0]!r} must be letters, digits, '_', '.' or '-' (it names a file)")
    repeated = sorted({name for name in names if names.count(name) > 1} | ({BASELINE} & set(names)))
    if repeated:
        raise UsageError(
            f"--model_path: the name {repeated[0]} is given twice (or is the baseline's); name each "
            "model once, as NAME=PATH"
        )
    unknown = sorted(set(args.benchmarks) - set(GROUPS))
    if unknown or not args.benchmarks:
        raise UsageError(f"--benchmarks: choose from {', '.join(GROUPS)} (got {','.join(unknown) or 'none'})")
    if args.benchmarks == ["helppages"] and args.helppage_tasks is None:
        raise UsageError(
            "--benchmarks helppages needs --helppage_tasks (the folder `python -m moelpr_lab.corpora --lm_eval_tasks` writes)"
        )
    overlap = sorted(set(args.new) & set(args.old))
    if overlap:
        raise UsageError(f"{', '.join(overlap)} is given as both new and old")
    if not args.new and not args.old:
        raise UsageError("no languages: give --new and/or --old")
    for option, path in (
        ("--flores_dir", args.flores_dir),
        ("--helppage_tasks", args.helppage_tasks),
        *(("--include_path", p) for p in args.include_path),
    ):
        if path is not None and not path.is_dir():
            raise UsageError(f"{option}: directory not found: {path}")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.max_gen_toks is not None and args.max_gen_toks < 1:
        raise UsageError("--max_gen_toks must be at least 1")
    if args.task_map is None:
        return None
    try:
        task_map = json.loads(args.task_map.read_text())
        if not all("metric" in entry and "tasks" in entry for entry in task_map.values()):
            raise ValueError("every benchmark needs metric and tasks")
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError(f"--task_map {args.task_map}: {error}") from None
    return task_map


def _bench(args: argparse.Namespace) -> None:
    require("eval", purpose="moelpr bench")  # lm-eval scores, sacrebleu's chrF intervals, matplotlib's chart
    task_map = _validated(args)
    logging.basicConfig(level=logging.INFO, format="[moelpr.bench] %(message)s")
    settings = BenchSettings(
        new=args.new,
        old=args.old,
        groups=args.benchmarks,
        flores_dir=args.flores_dir,
        helppage_tasks=args.helppage_tasks,
        task_map=task_map,
        include_paths=args.include_path,
        limit=args.limit,
        max_gen_toks=args.max_gen_toks,
        device=args.device,
        batch_size=int(args.batch_size) if args.batch_size.isdigit() else args.batch_size,
        dtype=args.dtype,
    )
    checkpoints = {**({BASELINE: args.baseline} if args.baseline else {}), **dict(args.model_path)}
    scored = score_models(checkpoints, args.output_dir, settings)
    for line in scored.missing:
        print(f"moelpr bench: {line}", file=sys.stderr)
    print(write_report(scored, args.output_dir, settings))
    print(f"Report written to {args.output_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("bench", build_parser(), _bench, argv)


if __name__ == "__main__":
    sys.exit(main())
