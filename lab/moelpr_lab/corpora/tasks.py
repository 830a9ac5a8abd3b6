"""Accuracy tasks without a download: lm-eval tasks from the held-out LibreOffice help pages of the built corpora.

The help is the same set of pages in every language, and held-out membership depends on the page only
(:func:`moelpr_lab.corpora.build.is_heldout`), so every language's ``{code}_heldout.jsonl`` holds translations of
the same pages, none of which any model trained on. Per language:

- ``helppages_completion_{code}``: HellaSwag's form. A paragraph of a page is cut in two at a word boundary near its
  middle; the model picks the true second half among it and three second halves of the closest length taken from
  other held-out pages (acc, and acc_norm per byte).
- ``helppages_translate_{code}_en`` and ``helppages_translate_en_{code}``: translation of aligned paragraphs of the
  same page in the two languages, few-shot, greedy, chrF.

Pages with as many paragraphs in both languages are not always aligned by position: the language filter drops
different paragraphs in each (an untranslated string, a menu path it misjudges), so one page can pair every paragraph
after the gap with its neighbour's translation. A positional pair is kept only where a sentence alignment of the whole
page (Gale & Church's, on lengths, with anchors: numbers and how a paragraph ends) aligns the two paragraphs one to
one, and both have the same anchors. Measured against the help's own paragraph ids (which the corpora do not keep),
this keeps no misaligned pair of de, fr, es, hu, tr, el but two of German's 309 (docs/comparison.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from moelpr.evaluation.lm_eval_tasks import TRANSLATION_SHOTS, write_completion_task, write_translation_task

TASKS_DIR = "lm_eval_tasks"
COMPLETION_WORDS = (8, 80)  # paragraphs of this many words make a completion item (shorter: too little to go on)
TRANSLATION_CHARS = (20, 300)  # aligned paragraphs of this many characters make a translation item
LENGTH_RATIO = 2.5  # aligned paragraphs whose lengths differ more than this are not taken as translations
# Gale & Church (1993): a translation's length is the source's times the pair's character ratio, with a variance
# proportional to the length; one paragraph matching none (the language filter dropped its partner) or two is rarer.
LENGTH_VARIANCE = 6.8
MOVE_PRIORS = {(1, 1): 0.89, (1, 0): 0.01, (0, 1): 0.01, (2, 1): 0.045, (1, 2): 0.045}
ANCHOR_MISMATCH_COST = 10.0  # a 1-1 bead whose anchors (:func:`_anchors`) differ costs this much more
_NUMBER = re.compile(r"\d+")


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


def _anchors(text: str) -> tuple[Counter, str]:
    """What a translation keeps of a paragraph: its numbers, and how it ends (a sentence, a lead-in to what follows
    such as "To access this command..." or "So greifen Sie auf diesen Befehl zu:", or neither: a heading)."""
    text = text.rstrip()
    ending = "lead-in" if text.endswith((":", "...", "\u2026")) else "sentence" if text[-1:] in ".!?" else "none"
    return Counter(_NUMBER.findall(text)), ending


def _bead_cost(source: Sequence[str], target: Sequence[str], ratio: float) -> float:
    """Gale & Church's cost of aligning the paragraphs ``source`` with ``target`` (either may be empty)."""
    cost = -math.log(MOVE_PRIORS[(len(source), len(target))])
    if source and target:
        length = sum(map(len, source))
        delta = (sum(map(len, target)) - ratio * length) / math.sqrt(LENGTH_VARIANCE * max(length, 1))
        cost -= math.log(max(math.erfc(abs(delta) / math.sqrt(2)), 1e-300))  # two-sided tail of the normal
        if _anchors(" ".join(source)) != _anchors(" ".join(target)):
            cost += ANCHOR_MISMATCH_COST
    return cost


def one_to_one_beads(source: Sequence[str], target: Sequence[str], ratio: float) -> set[tuple[int, int]]:
    """The (source index, target index) pairs that the cheapest monotone alignment of the two pages aligns one to
    one (dynamic programming over Gale & Church's moves: 1-1, 1-0, 0-1, 2-1, 1-2)."""
    inf = float("inf")
    cost = [[inf] * (len(target) + 1) for _ in range(len(source) + 1)]
    back: dict[tuple[int, int], tuple[int, int]] = {}
    cost[0][0] = 0.0
    for i in range(len(source) + 1):
        for j in range(len(target) + 1):
            for di, dj in MOVE_PRIORS:
                if (i, j) == (0, 0) or i < di or j < dj or cost[i - di][j - dj] == inf:
                    continue
                total = cost[i - di][j - dj] + _bead_cost(source[i - di : i], target[j - dj : j], ratio)
                if total < cost[i][j]:
                    cost[i][j], back[(i, j)] = total, (di, dj)
    beads, i, j = set(), len(source), len(target)
    while (i, j) != (0, 0):
        di, dj = back[(i, j)]
        i, j = i - di, j - dj
        if (di, dj) == (1, 1):
            beads.add((i, j))
    return beads


def aligned_paragraphs(source: dict[str, list[str]], target: dict[str, list[str]]) -> tuple[list[dict], int]:
    """Paragraph pairs of pages held out in both languages: pages with as many paragraphs in both (the language
    filter may drop some), paired in order, kept where both are of translation size and of comparable length and
    the page's sentence alignment (:func:`one_to_one_beads`) pairs them too. Also returns how many positional pairs
    of translation size the alignment rejected."""
    # Pages with as many paragraphs in both; the language pair's character ratio over all of them (a page that lost
    # paragraphs to the filter in one language only would bias it).
    common = [d for d in sorted(set(source) & set(target)) if len(source[d]) == len(target[d])]
    ratio = sum(len(p) for d in common for p in target[d]) / max(sum(len(p) for d in common for p in source[d]), 1)
    pairs, dropped = [], 0
    for doc_id in common:
        beads = None
        for index, (a, b) in enumerate(zip(source[doc_id], target[doc_id])):
            lengths = sorted((len(a), len(b)))
            if not (
                lengths[0] >= TRANSLATION_CHARS[0]
                and lengths[1] <= TRANSLATION_CHARS[1]
                and a != b
                and lengths[1] <= LENGTH_RATIO * lengths[0]
            ):
                continue
            beads = one_to_one_beads(source[doc_id], target[doc_id], ratio) if beads is None else beads
            if (index, index) in beads and _anchors(a) == _anchors(b):
                pairs.append({"id": f"{doc_id}#{index}", "source": a, "target": b})
            else:
                dropped += 1
    return pairs, dropped


def split_shots(pairs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """The prompt's examples and the scored items: the examples are the first pair of each of the first
    ``TRANSLATION_SHOTS`` pages, so that they are not one page's template (the three first pairs of the Spanish
    pages were three menu paths "Vaya a Ver ▸ ..." -> "Choose View - ...", and models that had lost Spanish answered
    most items with the last of them)."""
    first_of_page: dict[str, int] = {}
    for index, pair in enumerate(pairs):
        first_of_page.setdefault(pair["id"].rsplit("#", 1)[0], index)
    chosen = set(list(first_of_page.values())[:TRANSLATION_SHOTS])
    return [pairs[i] for i in sorted(chosen)], [pair for i, pair in enumerate(pairs) if i not in chosen]


def write_helppage_tasks(corpora_dir: Path, codes: Sequence[str], english: str = "en") -> dict[str, dict]:
    """Write the tasks of every language in ``codes`` (and the completion task of ``english``) under
    ``corpora_dir/lm_eval_tasks`` from the built ``{code}_heldout.jsonl`` files; returns the item counts per task.
    The translation tasks need the English held-out pages; the prompt's examples (:func:`split_shots`) are not
    scored."""
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
        pairs, dropped = aligned_paragraphs(pages[english], held_out)
        if len(pairs) <= TRANSLATION_SHOTS:
            continue
        reverse = [{"id": p["id"], "source": p["target"], "target": p["source"]} for p in pairs]
        for source, target, both in ((english, code, pairs), (code, english, reverse)):
            shots, test = split_shots(both)
            name = write_translation_task(out, translation_task_name(source, target), source, target, test, shots)
            counts[name] = {"items": len(test), "unaligned_pairs_dropped": dropped}
    (out / "tasks.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts
