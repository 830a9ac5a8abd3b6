"""Paired bootstrap intervals for a benchmark score's change against a baseline, resampling the scored items.

``moelpr bench`` keeps, for every task and model, each scored item's id (lm-eval's document hash) and its result:
1 or 0 for an accuracy, the (reference, prediction) pair for chrF, which is a corpus-level score and cannot be
averaged item by item. A bootstrap draw resamples the items of each task with replacement, the same draw for the
model and the baseline (paired: what decides whether a change is larger than the noise of a few dozen items),
recomputes both task scores, and takes the means the table takes: per benchmark over its languages, then over the
benchmarks. The tasks of different languages are drawn independently: their items are different paragraphs and
sentences, not one item in several languages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from moelpr.evaluation.intervals import (
    DEFAULT_LEVEL,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    bootstrap_counts,
    percentile_bounds,
    require_same_ids,
)

# One task's items: {"ids": [...], "values": [...]} in lm-eval's document order.
TaskItems = Mapping[str, Sequence]
# model -> benchmark -> language -> that task's items
ModelItems = Mapping[str, Mapping[str, Mapping[str, TaskItems]]]


def _statistics(metric: str, values: Sequence) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Per-item rows whose column sums (over a resample) determine the task score, and the map from sums to scores
    (in the table's units: accuracies in percent, chrF 0-100)."""
    if metric.startswith("chrf"):
        from sacrebleu.metrics import CHRF

        # chrF sums character n-gram statistics over the corpus before taking an F-score; sacrebleu's own
        # bootstrap resamples these per-sentence statistics the same way.
        chrf = CHRF(word_order=2 if metric == "chrf++" else 0)
        references = [[str(reference) for reference, _ in values]]
        stats = chrf._extract_corpus_statistics([str(prediction) for _, prediction in values], references)
        return np.asarray(stats, dtype=np.float64), lambda sums: np.array(
            [chrf._compute_score_from_stats(list(row)).score for row in sums])
    count = len(values)
    return np.asarray(values, dtype=np.float64)[:, None], lambda sums: 100 * sums[:, 0] / count


def task_score(metric: str, values: Sequence) -> float:
    """The task's score from its items, as lm-eval aggregates them."""
    stats, score = _statistics(metric, values)
    return float(score(stats.sum(axis=0, keepdims=True))[0])


def change_intervals(
    items: ModelItems,
    metrics: Mapping[str, str],
    groups: Mapping[str, Mapping[str, Sequence[str]]],
    baseline: str,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> dict[str, dict]:
    """Every model's change against ``baseline`` with its paired interval: ``model -> {"benchmarks": {benchmark:
    {group: (low, high)}}, group: (low, high)}``, where ``groups`` gives each benchmark's languages per group
    (``expanded`` / ``original``) and ``metrics`` each benchmark's metric. A group's overall interval is for the
    mean over the benchmarks that have the group, as the table's averages are. Items of different documents refuse
    in one line (:class:`MismatchedDocuments`)."""
    base_scores: dict[tuple[str, str], np.ndarray] = {}
    draws: dict[tuple[str, str], np.ndarray] = {}
    for index, (key, lang) in enumerate((k, lang) for k in groups for langs in groups[k].values() for lang in langs):
        task = items[baseline][key][lang]
        draws[key, lang] = bootstrap_counts(len(task["ids"]), samples, seed + index)
        stats, score = _statistics(metrics[key], task["values"])
        base_scores[key, lang] = score(draws[key, lang] @ stats)
    result: dict[str, dict] = {}
    for model, model_items in items.items():
        if model == baseline:
            continue
        per_benchmark: dict[str, dict[str, np.ndarray]] = {}
        for key, by_group in groups.items():
            for group, langs in by_group.items():
                if not langs:
                    continue
                changes = []
                for lang in langs:
                    task = model_items[key][lang]
                    require_same_ids(
                        items[baseline][key][lang]["ids"], task["ids"],
                        f"{model} and {baseline} were scored on different items of {key} / {lang}",
                        "score them with the same task files and --limit",
                    )
                    stats, score = _statistics(metrics[key], task["values"])
                    changes.append(score(draws[key, lang] @ stats) - base_scores[key, lang])
                per_benchmark.setdefault(key, {})[group] = np.mean(changes, axis=0)
        entry: dict = {"benchmarks": {
            key: {group: percentile_bounds(change, level) for group, change in by_group.items()}
            for key, by_group in per_benchmark.items()
        }}
        for group in ("expanded", "original"):
            means = [by_group[group] for by_group in per_benchmark.values() if group in by_group]
            if means:
                entry[group] = percentile_bounds(np.mean(means, axis=0), level)
        result[model] = entry
    return result
