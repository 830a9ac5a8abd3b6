"""The review-budget table and picture: what each review (LPR form, share of stage 1's tokens, steps, seed) does to
the old and the new languages, against the base model and against stage 1 (``scripts/paper_budget.sh
--review-budget`` writes the reviews file and runs this; see docs/results.md).

``python -m moelpr_lab.review_budget --eval_dir DIR --reviews REVIEWS.json --output_dir OUT``

``REVIEWS.json`` names the evaluated base model and stage 1, stage 1's training tokens, and each review::

    {"base": "base", "stage1": "stage1", "stage1_tokens": 614400,
     "reviews": [{"name": "review5_none", "arm": "none", "percent": 5, "steps": 30, "batch": 4, "seed": 42,
                  "tokens": 30720}, ...]}

``arm``: ``paper`` or ``authors`` (the LPR loss form) or ``none`` (the same replay with ``lpr_loss_coef: 0``).
Every change is a perplexity ratio minus one with a 95% bootstrap interval paired over the held-out documents;
*recovery* is the share of stage 1's log-perplexity loss on general English that the review takes back
(``(log ppl_stage1 - log ppl_review) / (log ppl_stage1 - log ppl_base)``: 100% = back at the base model).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from moelpr.evaluation.intervals import change_interval, document_units, gain_share_interval, mean_change_interval
from moelpr.models.statistics import EXPERT0_TOP1_SHARE_KEY

from .comparison import percent_cell

ARMS = ("paper", "authors", "none")
ARM_LABELS = {"paper": "LPR, paper's form", "authors": "LPR, authors' form", "none": "no LPR (replay only)"}
GENERAL, HELP = "en_general", "en"


class ReviewBudgetError(ValueError):
    """A reviews file or report that does not hold what the table needs."""


def _change(reference: Mapping, other: Mapping) -> list[float]:
    units_reference, units_other = document_units(reference), document_units(other)
    low, high = change_interval(units_reference, units_other, paired=True)
    return [other["perplexity"] / reference["perplexity"] - 1, low, high]


def _mean_change(reference: Mapping, other: Mapping, languages: Sequence[str]) -> list[float]:
    return list(
        mean_change_interval([(document_units(reference[lang]), document_units(other[lang])) for lang in languages])
    )


def old_expert0_share(routing: Mapping, old: Sequence[str]) -> float:
    """Share of old-language tokens whose top-1 expert is expert 0, over the MoE layers (mean) and the old
    languages (weighted by their evaluated tokens)."""
    languages = routing["languages"]
    tokens = sum(languages[lang]["tokens"] for lang in old)
    return (
        sum(
            languages[lang]["tokens"]
            * sum(languages[lang][EXPERT0_TOP1_SHARE_KEY])
            / len(languages[lang][EXPERT0_TOP1_SHARE_KEY])
            for lang in old
        )
        / tokens
    )


def review_budget(eval_dir: Path, reviews_file: Path) -> dict:
    """Every figure of the table (see the module docstring)."""
    report = json.loads((eval_dir / "perplexity.json").read_text())
    routing = json.loads((eval_dir / "routing.json").read_text())
    spec = json.loads(reviews_file.read_text())
    models, languages = report["models"], report["languages"]
    for name in (spec["base"], spec["stage1"], *(r["name"] for r in spec["reviews"])):
        if name not in models:
            raise ReviewBudgetError(f"model {name!r} is not in {eval_dir}/perplexity.json")
    for review in spec["reviews"]:
        if review["arm"] not in ARMS:
            raise ReviewBudgetError(f"review {review['name']!r}: arm {review['arm']!r} is not one of {', '.join(ARMS)}")
    if GENERAL not in languages or HELP not in languages:
        raise ReviewBudgetError(f"the report has no {GENERAL} or {HELP} held-out language")
    new = [lang for lang, role in languages.items() if role == "new"]
    old = [lang for lang, role in languages.items() if role == "old"]
    base, stage1 = models[spec["base"]]["languages"], models[spec["stage1"]]["languages"]

    def row(name: str) -> dict:
        cells = models[name]["languages"]
        return {
            "general_english": {
                "vs_base": _change(base[GENERAL], cells[GENERAL]),
                "vs_stage1": _change(stage1[GENERAL], cells[GENERAL]),
            },
            "help_english": {
                "vs_base": _change(base[HELP], cells[HELP]),
                "vs_stage1": _change(stage1[HELP], cells[HELP]),
            },
            "new_mean": {"vs_base": _mean_change(base, cells, new), "vs_stage1": _mean_change(stage1, cells, new)},
            "old_expert0_top1_share": old_expert0_share(routing[name], old),
        }

    stage1_row = row(spec["stage1"])
    rows = []
    for review in spec["reviews"]:
        entry = {**review, **row(review["name"])}
        entry["general_english_recovery"] = list(
            gain_share_interval(
                document_units(stage1[GENERAL]),
                document_units(base[GENERAL]),
                document_units(models[review["name"]]["languages"][GENERAL]),
            )
        )
        rows.append(entry)
    return {
        "base": spec["base"],
        "stage1": {"name": spec["stage1"], "tokens": spec["stage1_tokens"], **stage1_row},
        "new": new,
        "old": old,
        "reviews": rows,
        "settings": report["settings"],
    }


def markdown(result: dict) -> str:
    stage1 = result["stage1"]
    lines = [
        "# The review budget: each review against the base model and against stage 1",
        "",
        f"Stage 1: {stage1['tokens']:,} tokens of {', '.join(result['new'])}. Perplexity change, 95% bootstrap "
        "interval paired over held-out documents (`*`: excludes 0). Recovery: the share of stage 1's general-English "
        "loss the review takes back (100% = the base model). Expert 0: share of old-language tokens whose top-1 "
        "expert is the original FFN (mean over the MoE layers).",
        "",
        "| review | share of stage 1 | steps x batch | seed | general English vs base | vs stage 1 | recovery "
        "| help English vs base | new languages vs base | vs stage 1 | expert 0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| stage 1 (no review) | | | | {percent_cell(*stage1['general_english']['vs_base'])} | | "
        f"| {percent_cell(*stage1['help_english']['vs_base'])} | {percent_cell(*stage1['new_mean']['vs_base'])} | "
        f"| {100 * stage1['old_expert0_top1_share']:.0f}% |",
    ]
    for r in sorted(result["reviews"], key=lambda r: (r["percent"], r["steps"], ARMS.index(r["arm"]), r["seed"])):
        recovery, low, high = r["general_english_recovery"]
        lines.append(
            f"| {ARM_LABELS[r['arm']]} | {r['percent']:g}% | {r['steps']} x {r['batch']} | {r['seed']} "
            f"| {percent_cell(*r['general_english']['vs_base'])} | {percent_cell(*r['general_english']['vs_stage1'])} "
            f"| {100 * recovery:.0f}% [{100 * low:.0f}, {100 * high:.0f}] | {percent_cell(*r['help_english']['vs_base'])} "
            f"| {percent_cell(*r['new_mean']['vs_base'])} | {percent_cell(*r['new_mean']['vs_stage1'])} "
            f"| {100 * r['old_expert0_top1_share']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def recovery_plot(result: dict, path: Path) -> None:
    """Recovery of general English (y) against the review's tokens (x, log scale), one line per arm through the
    mean of its seeds at each budget, each review's interval as a bar; reviews with smaller batches (more steps for
    the same tokens) as open marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    batch = max(r["batch"] for r in result["reviews"])
    for arm in ARMS:
        rows = [r for r in result["reviews"] if r["arm"] == arm]
        if not rows:
            continue
        full = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["tokens"])
        tokens = sorted({r["tokens"] for r in full})
        means = [
            100
            * sum(r["general_english_recovery"][0] for r in full if r["tokens"] == t)
            / sum(1 for r in full if r["tokens"] == t)
            for t in tokens
        ]
        (line,) = ax.plot(tokens, means, marker="o", label=ARM_LABELS[arm])
        # Each review (every seed) with its bootstrap interval over the held-out documents.
        recovery = [[100 * v for v in r["general_english_recovery"]] for r in full]
        ax.errorbar(
            [r["tokens"] for r in full],
            [y for y, _, _ in recovery],
            yerr=[[y - low for y, low, _ in recovery], [high - y for y, _, high in recovery]],
            fmt="none",
            ecolor=line.get_color(),
            capsize=3,
            alpha=0.6,
        )
        small = [r for r in rows if r["batch"] != batch]
        if small:
            ax.scatter(
                [r["tokens"] for r in small],
                [100 * r["general_english_recovery"][0] for r in small],
                facecolors="none",
                edgecolors=line.get_color(),
                s=60,
                label=f"{ARM_LABELS[arm]}, batch {small[0]['batch']} ({small[0]['steps']} steps)",
            )
    ax.axhline(100, color="grey", linewidth=0.8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"review tokens (stage 1: {result['stage1']['tokens']:,})")
    ax.set_ylabel("general English: share of stage 1's loss recovered, %")
    ax.set_title("How much of general English the review recovers, by review size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelpr_lab.review_budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval_dir", type=Path, required=True, help="a moelpr eval output directory")
    parser.add_argument("--reviews", type=Path, required=True, help="the reviews file (see the module docstring)")
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = review_budget(args.eval_dir, args.reviews)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as error:
        print(f"review_budget: error: {error}", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "review_budget.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.output_dir / "review_budget.md").write_text(table)
    recovery_plot(result, args.output_dir / "review_budget.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
