"""Paired bootstrap intervals of benchmark score changes (moelpr.evaluation.score_intervals)."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from moelpr.evaluation.intervals import MismatchedDocuments
from moelpr.evaluation.score_intervals import change_intervals, task_score

REFERENCES = ["the cat sat on the mat", "open the file menu", "press enter to accept", "choose a format",
              "the sidebar shows the properties", "insert a chart from the menu"]


def accuracy_items(values, ids=None):
    return {"ids": ids or [f"doc{i}" for i in range(len(values))], "values": list(values)}


def test_task_scores_are_lm_evals_aggregates():
    predictions = ["the cat sat on a mat", "open file", "press the enter key", "choose format", "sidebar", "a chart"]
    pairs = list(zip(REFERENCES, predictions))
    assert task_score("chrf", pairs) == pytest.approx(sacrebleu.corpus_chrf(predictions, [REFERENCES]).score)
    assert task_score("acc_norm", [1, 0, 1, 1]) == pytest.approx(75.0)


def test_paired_interval_of_a_change_in_accuracy():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 200)
    better = np.where(rng.random(200) < 0.3, 1, base)  # the baseline's answers, some wrong ones put right
    groups = {"completion": {"expanded": ["hu"], "original": []}}
    items = {"baseline": {"completion": {"hu": accuracy_items(base)}},
             "same": {"completion": {"hu": accuracy_items(base)}},
             "better": {"completion": {"hu": accuracy_items(better)}}}
    found = change_intervals(items, {"completion": "acc_norm"}, groups, "baseline")
    assert found["same"]["expanded"] == (0.0, 0.0)  # paired: identical answers change by nothing in every draw
    low, high = found["better"]["expanded"]
    change = 100 * (better.mean() - base.mean())
    assert 0 < low < change < high
    # Unpaired, the two means' own binomial noise (sd ~3.5 points each at n=200) would give about 19.6 points;
    # paired, only the items whose answers differ move the change (about 10 points here).
    assert high - low < 0.7 * 2 * 1.96 * 100 * np.sqrt(2 * 0.25 / 200)


def test_interval_of_a_mean_over_languages_and_benchmarks():
    rng = np.random.default_rng(2)
    tasks = {lang: rng.integers(0, 2, 60) for lang in ("hu", "tr", "en")}
    groups = {"a": {"expanded": ["hu", "tr"], "original": ["en"]}, "b": {"expanded": ["hu"], "original": []}}
    base = {key: {lang: accuracy_items(tasks[lang]) for lang in langs["expanded"] + langs["original"]}
            for key, langs in groups.items()}
    all_right = {key: {lang: accuracy_items(np.ones(60, int)) for lang in cells} for key, cells in base.items()}
    found = change_intervals({"baseline": base, "model": all_right}, {"a": "acc", "b": "acc"}, groups, "baseline")
    # Every draw of an all-right model scores 100; the baseline's draws spread, so the change spreads around
    # the mean of the per-benchmark means of (100 - baseline).
    expected = np.mean([np.mean([100 - 100 * tasks[lang].mean() for lang in ("hu", "tr")]),
                        100 - 100 * tasks["hu"].mean()])
    low, high = found["model"]["expanded"]
    assert low < expected < high
    assert set(found["model"]["benchmarks"]) == {"a", "b"} and "original" not in found["model"]["benchmarks"]["b"]


def test_items_of_different_documents_are_refused():
    groups = {"completion": {"expanded": ["hu"], "original": []}}
    items = {"baseline": {"completion": {"hu": accuracy_items([1, 0, 1])}},
             "model": {"completion": {"hu": accuracy_items([1, 1, 1], ids=["doc0", "doc1", "other"])}}}
    with pytest.raises(MismatchedDocuments, match="different items of completion / hu"):
        change_intervals(items, {"completion": "acc"}, groups, "baseline")
