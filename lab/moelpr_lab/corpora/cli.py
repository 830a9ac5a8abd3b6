"""``python -m moelpr_lab.corpora``: build the demo corpora (see ``--help``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .build import UNSEEN, CorpusOptions, build_corpora, general_english_corpus, help_corpus
from .debian import CorpusError


def _codes(value: str) -> list[str]:
    return [code for code in (part.strip() for part in value.split(",")) if code]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moelpr_lab.corpora",
        description="Build per-language train / held-out corpora from Debian's LibreOffice help and fortunes.",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("work/corpora"), help="where the jsonl files and dataset_info.json go")
    parser.add_argument("--cache_dir", type=Path, default=Path("work/cache/debian"), help="downloaded and unpacked .deb files")
    parser.add_argument("--new", type=_codes, default=_codes("hu,tr,el"), help="new languages (LibreOffice help codes, comma-separated)")
    parser.add_argument("--old", type=_codes, default=_codes("en"), help="old languages (LibreOffice help codes, comma-separated)")
    parser.add_argument(
        "--unseen", type=_codes, default=[],
        help="old languages evaluated only (the paper's unseen original languages, e.g. de,fr,es): held-out pages only, "
        "no train file and no dataset_info.json entry",
    )
    parser.add_argument("--no_general_english", action="store_true", help="skip the general-English corpus from `fortunes`")
    parser.add_argument("--heldout_fraction", type=float, default=CorpusOptions.heldout_fraction)
    parser.add_argument("--max_documents", type=int, default=None, help="consider at most this many help pages / fortunes per corpus")
    parser.add_argument("--max_train_chars", type=int, default=None, help="cap on the train text per corpus")
    parser.add_argument("--max_heldout_chars", type=int, default=None, help="cap on the held-out text per corpus")
    parser.add_argument("--workers", type=int, default=None, help="processes for parsing (default: all cores)")
    parser.add_argument("--lm_eval_tasks", action="store_true",
                        help="also write lm-eval tasks from the held-out help pages (completion and translation per "
                             "language) to OUTPUT_DIR/lm_eval_tasks, for `moelpr bench --helppage_tasks`; needs --old en")
    args = parser.parse_args(argv)
    overlap = sorted(set(args.unseen) & set(args.new + args.old))
    if overlap:
        parser.error(f"--unseen languages are never trained on, so they cannot also be --new or --old: {overlap}")
    if not 0 < args.heldout_fraction < 1:
        parser.error("--heldout_fraction must be between 0 and 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.lm_eval_tasks and "en" not in args.old:
        print("error: --lm_eval_tasks translates from and to English: add en to --old", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[moelpr_lab.corpora] %(message)s")
    specs = [help_corpus(code, "new") for code in args.new] + [help_corpus(code, "old") for code in args.old]
    specs += [help_corpus(code, UNSEEN) for code in args.unseen]
    if not args.no_general_english:
        specs.append(general_english_corpus())
    options = CorpusOptions(args.heldout_fraction, args.max_documents, args.max_train_chars, args.max_heldout_chars)
    try:
        build_corpora(specs, args.output_dir, args.cache_dir, options, args.workers)
    except (CorpusError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.lm_eval_tasks:
        from .tasks import TASKS_DIR, write_helppage_tasks

        counts = write_helppage_tasks(args.output_dir, [*args.new, *args.old, *args.unseen])
        print(f"{len(counts)} lm-eval tasks in {args.output_dir / TASKS_DIR}: "
              + ", ".join(f"{name} ({entry['items']})" for name, entry in counts.items()))
    print(f"Corpora and dataset_info.json are in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
