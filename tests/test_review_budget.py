"""The review-budget table (`python -m moelpr_lab.review_budget`) against hand computations on a small made-up
evaluation report: changes against the base and against stage 1, the recovery of general English and the
old-language expert-0 share."""

from __future__ import annotations

import json
import math

import pytest

from moelpr_lab.review_budget import main, review_budget

LANGUAGES = {"hu": "new", "tr": "new", "en": "old", "en_general": "old"}
DOCS = 6
TOKENS = 100


def _cell(log_ppl: float, spread: float = 0.05) -> dict:
    # Documents of TOKENS tokens each whose losses scatter around the language's log-perplexity.
    nll = [TOKENS * (log_ppl + spread * ((i % 3) - 1)) for i in range(DOCS)]
    ppl = math.exp(sum(nll) / (TOKENS * DOCS))
    return {"perplexity": ppl, "interval": [ppl, ppl], "document_nll": nll, "document_tokens": [TOKENS] * DOCS,
            "document_ids": [f"page{i}" for i in range(DOCS)]}


def _write(tmp_path, reviews: list[dict]) -> tuple:
    # log-perplexities: stage 1 learns hu and tr and forgets general English; the reviews take part of it back.
    log_ppl = {
        "base": {"hu": 4.0, "tr": 3.6, "en": 3.0, "en_general": 4.0},
        "stage1": {"hu": 2.0, "tr": 2.2, "en": 2.9, "en_general": 4.4},
        "review5_paper": {"hu": 2.02, "tr": 2.21, "en": 2.8, "en_general": 4.2},   # half of the 0.4 taken back
        "review5_none": {"hu": 2.01, "tr": 2.2, "en": 2.85, "en_general": 4.3},    # a quarter
    }
    models = {name: {"path": f"/models/{name}", "languages": {lang: _cell(v) for lang, v in cells.items()}}
              for name, cells in log_ppl.items()}
    report = {"models": models, "languages": LANGUAGES, "settings": {"bootstrap": {"level": 0.95}}}
    expert0 = {"stage1": ([0.2, 0.1], [0.1, 0.1]), "review5_paper": ([0.6, 0.4], [0.3, 0.5]),
               "review5_none": ([0.3, 0.3], [0.2, 0.2])}
    routing = {name: {"method": "lpr", "languages": {
        "en": {"role": "old", "tokens": 300, "expert0_top1_share": en},
        "en_general": {"role": "old", "tokens": 100, "expert0_top1_share": general},
        "hu": {"role": "new", "tokens": 300, "expert0_top1_share": [0.0, 0.0]},
        "tr": {"role": "new", "tokens": 300, "expert0_top1_share": [0.0, 0.0]},
    }} for name, (en, general) in expert0.items()}
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "perplexity.json").write_text(json.dumps(report))
    (eval_dir / "routing.json").write_text(json.dumps(routing))
    spec = tmp_path / "reviews.json"
    spec.write_text(json.dumps({"base": "base", "stage1": "stage1", "stage1_tokens": 614400, "reviews": reviews}))
    return eval_dir, spec, log_ppl


REVIEWS = [
    {"name": "review5_none", "arm": "none", "percent": 5, "steps": 30, "batch": 4, "seed": 42, "tokens": 30720},
    {"name": "review5_paper", "arm": "paper", "percent": 5, "steps": 30, "batch": 4, "seed": 42, "tokens": 30720},
]


def test_changes_recovery_and_expert0_share_match_a_hand_computation(tmp_path):
    eval_dir, spec, log_ppl = _write(tmp_path, REVIEWS)
    result = review_budget(eval_dir, spec)
    rows = {row["name"]: row for row in result["reviews"]}
    paper, none = rows["review5_paper"], rows["review5_none"]

    assert paper["general_english_recovery"][0] == pytest.approx(0.5)
    assert none["general_english_recovery"][0] == pytest.approx(0.25)
    low, high = paper["general_english_recovery"][1:]
    assert low <= 0.5 <= high

    assert paper["general_english"]["vs_base"][0] == pytest.approx(math.exp(4.2 - 4.0) - 1)
    assert paper["general_english"]["vs_stage1"][0] == pytest.approx(math.exp(4.2 - 4.4) - 1)
    assert none["help_english"]["vs_stage1"][0] == pytest.approx(math.exp(2.85 - 2.9) - 1)
    new_vs_stage1 = (math.expm1(2.02 - 2.0) + math.expm1(2.21 - 2.2)) / 2
    assert paper["new_mean"]["vs_stage1"][0] == pytest.approx(new_vs_stage1)
    stage1_new = (math.expm1(2.0 - 4.0) + math.expm1(2.2 - 3.6)) / 2
    assert result["stage1"]["new_mean"]["vs_base"][0] == pytest.approx(stage1_new)

    # Mean over the layers, then weighted by the old languages' tokens (en 300, en_general 100).
    assert paper["old_expert0_top1_share"] == pytest.approx((300 * 0.5 + 100 * 0.4) / 400)
    assert result["stage1"]["old_expert0_top1_share"] == pytest.approx((300 * 0.15 + 100 * 0.1) / 400)


def test_the_command_writes_the_table_and_the_picture_and_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    eval_dir, spec, _ = _write(tmp_path, REVIEWS)
    out = tmp_path / "out"
    assert main(["--eval_dir", str(eval_dir), "--reviews", str(spec), "--output_dir", str(out)]) == 0
    table = (out / "review_budget.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    # Header, stage 1, then the reviews in the arms' order (paper before none) at the same budget.
    assert lines[1].startswith("| stage 1") and lines[2].startswith("| LPR, paper's form | 5% | 30 x 4 | 42")
    assert lines[3].startswith("| no LPR (replay only)") and "| 25% [" in lines[3]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert (out / "review_budget.png").stat().st_size > 0
    assert json.loads((out / "review_budget.json").read_text())["stage1"]["tokens"] == 614400
    capsys.readouterr()

    _, bad, _ = _write(tmp_path / "bad", [{**REVIEWS[0], "arm": "replay"}])
    assert main(["--eval_dir", str(eval_dir), "--reviews", str(bad), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("review_budget: error: review 'review5_none': arm 'replay'") and err.count("\n") == 1
