"""Accuracy tasks without a download: lm-eval tasks from the held-out LibreOffice help pages of the built corpora.

The help is the same set of pages in every language, and held-out membership depends on the page only
(:func:`moelpr_lab.corpora.build.is_heldout`), so every language's ``{code}_heldout.jsonl`` holds translations of
the same pages, none of which any model trained on. Per language:

- ``helppages_completion_{code}``: HellaSwag's form. A paragraph of a page is cut in two at a word boundary near its
  middle; the model picks the true second half among it and three second halves of the closest length taken from
  other held-out pages (acc, and acc_norm per byte).
- ``helppages_translate_{code}_en`` and ``helppages_translate_en_{code}``: translation of aligned paragraphs of the
  same page in the two languages, few-shot, greedy, chrF.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from moelpr.evaluation.lm_eval_tasks import TRANSLATION_SHOTS, write_completion_task, write_translation_task

TASKS_DIR = "lm_eval_tasks"
COMPLETION_WORDS = (8, 80)  # paragraphs of this many words make a completion item (shorter: too little to go on)
TRANSLATION_CHARS = (20, 300)  # aligned paragraphs of this many characters make a translation item
LENGTH_RATIO = 2.5  # aligned paragraphs whose lengths differ more than this are not taken as translations


def completion_task_name(code: str) -> str:
    return f"helppages_completion_{code}"


def translation_task_name(source: str, target: str) -> str:
    return f"helppages_translate_{source}_{target}"


def _pick(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _pages(path: Path) -> dict[str, list[str]]:
    """Held-out page id -> its paragraphs (the corpora builder joins a help page's paragraphs with newlines)."""
    pages = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                pages[record["id"]] = [p for p in record["text"].split("\n") if p.strip()]
    return pages


def completion_items(pages: dict[str, list[str]], code: str) -> list[dict]:
    """One item per held-out page that has a paragraph of ``COMPLETION_WORDS`` words: its longest such paragraph
    cut at the middle word; three endings of other pages with the closest lengths; the true one at a position
    fixed by the page id (so that the position says nothing)."""
    halves = []
    for doc_id in sorted(pages):
        candidates = [p for p in pages[doc_id] if COMPLETION_WORDS[0] <= len(p.split()) <= COMPLETION_WORDS[1]]
        if candidates:
            words = max(candidates, key=len).split()
            middle = len(words) // 2
            halves.append((doc_id, " ".join(words[:middle]), " ".join(words[middle:])))
    items = []
    for doc_id, context, ending in halves:
        others = sorted((abs(len(e) - len(ending)), e) for other, _, e in halves if other != doc_id and e != ending)
        distractors = list(dict.fromkeys(e for _, e in others))[:3]
        if len(distractors) < 3:
            continue
        label = _pick(f"{code}:{doc_id}") % 4
        endings = distractors[:label] + [ending] + distractors[label:]
        items.append({"id": doc_id, "context": context, "endings": endings, "label": label})
    return items


def aligned_paragraphs(source: dict[str, list[str]], target: dict[str, list[str]]) -> list[dict]:
    """Paragraph pairs of pages held out in both languages: pages with as many paragraphs in both (the language
    filter may drop some), paired in order, kept where both are of translation size and of comparable length."""
    pairs = []
    for doc_id in sorted(set(source) & set(target)):
        if len(source[doc_id]) != len(target[doc_id]):
            continue
        for index, (a, b) in enumerate(zip(source[doc_id], target[doc_id])):
            lengths = sorted((len(a), len(b)))
            if lengths[0] >= TRANSLATION_CHARS[0] and lengths[1] <= TRANSLATION_CHARS[1] and a != b \
                    and lengths[1] <= LENGTH_RATIO * lengths[0]:
                pairs.append({"id": f"{doc_id}#{index}", "source": a, "target": b})
    return pairs


def write_helppage_tasks(corpora_dir: Path, codes: Sequence[str], english: str = "en") -> dict[str, dict]:
    """Write the tasks of every language in ``codes`` (and the completion task of ``english``) under
    ``corpora_dir/lm_eval_tasks`` from the built ``{code}_heldout.jsonl`` files; returns the item counts per task.
    The translation tasks need the English held-out pages; the first ``TRANSLATION_SHOTS`` pairs are the prompt's
    examples and are not scored."""
    out = corpora_dir / TASKS_DIR
    out.mkdir(parents=True, exist_ok=True)
    pages = {code: _pages(corpora_dir / f"{code}_heldout.jsonl") for code in dict.fromkeys([*codes, english])}
    counts: dict[str, dict] = {}
    for code, held_out in pages.items():
        items = completion_items(held_out, code)
        if items:
            counts[write_completion_task(out, completion_task_name(code), items)] = {"items": len(items)}
        if code == english:
            continue
        pairs = aligned_paragraphs(pages[english], held_out)
        if len(pairs) <= TRANSLATION_SHOTS:
            continue
        reverse = [{"id": p["id"], "source": p["target"], "target": p["source"]} for p in pairs]
        for source, target, both in ((english, code, pairs), (code, english, reverse)):
            shots, test = both[:TRANSLATION_SHOTS], both[TRANSLATION_SHOTS:]
            name = write_translation_task(out, translation_task_name(source, target), source, target, test, shots)
            counts[name] = {"items": len(test)}
    (out / "tasks.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts
