"""``python -m moelpr_lab.corpora.alignment_check``: how many translation pairs of the help-page tasks are true
translations, judged by the help's own paragraph ids.

The corpora keep a page's paragraphs without their ids, so :func:`moelpr_lab.corpora.tasks.aligned_paragraphs`
aligns them by text. The unpacked packages still have the ids (``par_id3150440``, ``hd_id3153255``: the same in every
language, as the translations are made per paragraph), so here each paragraph of a pair is looked up in its page's
HTML and the pair counts as aligned where the two carry the same id. A paragraph without an id of its own (the
"To access this command..." lines, some headings) is named by its nearest ancestor's id and its rank below it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .build import help_corpus
from .sources import _BLOCK_TAGS, _VOID_TAGS, _HelpPageParser, help_language_dir
from .tasks import _pages, aligned_paragraphs

# Block elements that hold paragraphs rather than being one.
_CONTAINERS = frozenset({"div", "table", "tr", "ul", "ol"})


class _IdParser(_HelpPageParser):
    """The help-page parser, also naming each paragraph by the source id of the element it is in."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self._elements: list[tuple[str, str | None]] = []  # (tag, id) of every open non-void element
        self._ranks: dict[str | None, int] = {}

    def _flush(self) -> None:
        if " ".join("".join(self._buffer).split()):
            own = next((i for t, i in reversed(self._elements) if t in _BLOCK_TAGS and t not in _CONTAINERS), None)
            if own is None:
                ancestor = next((i for _, i in reversed(self._elements) if i), None)
                self._ranks[ancestor] = self._ranks.get(ancestor, 0) + 1
                own = f"{ancestor}/{self._ranks[ancestor]}"
            self.ids.append(own)
        super()._flush()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        super().handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS:
            self._elements.append((tag, dict(attrs).get("id")))

    def handle_endtag(self, tag: str) -> None:
        super().handle_endtag(tag)
        for depth in range(len(self._elements) - 1, -1, -1):
            if self._elements[depth][0] == tag:
                del self._elements[depth:]
                break


def paragraph_ids(html: str) -> dict[str, set[str]]:
    """Paragraph text -> the source ids it has on the page (a text can repeat)."""
    parser = _IdParser()
    parser.feed(html)
    parser.close()
    ids: dict[str, set[str]] = {}
    for text, paragraph_id in zip(parser.paragraphs, parser.ids):
        ids.setdefault(text, set()).add(paragraph_id)
    return ids


def check(corpora_dir: Path, cache_dir: Path, codes: Sequence[str], english: str = "en") -> dict[str, dict]:
    """Per language: the pairs the tasks keep and drop, and how many of each carry the same id in both languages."""
    help_dirs = {
        code: help_language_dir(cache_dir / "unpacked" / help_corpus(code, "old").package) for code in [english, *codes]
    }
    cached: dict[tuple[str, str], dict[str, set[str]]] = {}

    def ids(code: str, doc_id: str) -> dict[str, set[str]]:
        if (code, doc_id) not in cached:
            cached[(code, doc_id)] = paragraph_ids((help_dirs[code] / doc_id).read_text(encoding="utf-8"))
        return cached[(code, doc_id)]

    def same_id(pair: dict, code: str) -> bool:
        doc_id = pair["id"].rsplit("#", 1)[0]
        return bool(ids(english, doc_id).get(pair["source"], set()) & ids(code, doc_id).get(pair["target"], set()))

    english_pages = _pages(corpora_dir / f"{english}_heldout.jsonl")
    report = {}
    for code in codes:
        pages = _pages(corpora_dir / f"{code}_heldout.jsonl")
        kept, dropped = aligned_paragraphs(english_pages, pages)
        report[code] = {"kept": len(kept), "kept_same_id": sum(same_id(p, code) for p in kept), "dropped": dropped}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moelpr_lab.corpora.alignment_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--corpora_dir", type=Path, required=True, help="built corpora (python -m moelpr_lab.corpora)")
    parser.add_argument("--cache_dir", type=Path, required=True, help="its --cache_dir (the unpacked packages)")
    parser.add_argument("--languages", default="de,fr,es,hu,tr,el", help="comma-separated, each built with en")
    args = parser.parse_args(argv)
    codes = [code for code in args.languages.split(",") if code]
    try:
        report = check(args.corpora_dir, args.cache_dir, codes)
    except (OSError, ValueError) as error:  # corpora not built, or packages not unpacked in --cache_dir
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
