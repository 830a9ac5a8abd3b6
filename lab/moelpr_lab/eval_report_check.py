"""``python -m moelpr_lab.eval_report_check DIR``: check that a ``moelpr eval`` report is complete and well formed
(what CI asserts after ``scripts/demo.sh --quick``). Exit status 0 when it is, 1 with one line per problem."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from moelpr.models.statistics import EXPERT0_TOP1_SHARE_KEY, FFN_FUSION_WEIGHT_KEY, MEAN_ROUTER_PROB_KEY, TOP1_SHARE_KEY


def _csv(value: str) -> list[str]:
    return [item for item in (part.strip() for part in value.split(",")) if item]


def _check_png(path: Path, problems: list[str]) -> None:
    import matplotlib.image

    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return
    image = matplotlib.image.imread(path)
    if min(image.shape[:2]) < 200:
        problems.append(f"{path.name} is only {image.shape[1]}x{image.shape[0]} pixels")


def _experts_per_layer(entry: dict) -> list[int]:
    """``num_experts`` of a routing.json entry, one count for every layer or one per layer, as a list per layer."""
    counts = entry["num_experts"]
    return list(counts) if isinstance(counts, list) else [counts] * len(entry["layers"])


def check_report(report_dir: Path, models: Sequence[str] = (), languages: Sequence[str] = (), runs: bool = False) -> list[str]:
    """Problems found in the report in ``report_dir``; ``models`` / ``languages`` must all be present."""
    problems: list[str] = []
    try:
        perplexity = json.loads((report_dir / "perplexity.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [f"perplexity.json unreadable: {error}"]
    report_languages = perplexity.get("languages", {})
    problems += [f"language {lang} missing" for lang in languages if lang not in report_languages]
    problems += [f"model {name} missing" for name in models if name not in perplexity.get("models", {})]
    moe_models = []
    for name, entry in perplexity.get("models", {}).items():
        if entry.get("kind") == "moe":
            moe_models.append(name)
        for lang in report_languages:
            result = entry.get("languages", {}).get(lang)
            if result is None:
                problems.append(f"{name}: no result for {lang}")
                continue
            ppl, tokens = result.get("perplexity"), result.get("predicted_tokens")
            if not (isinstance(tokens, int) and tokens > 0):
                problems.append(f"{name}/{lang}: predicted_tokens {tokens!r}")
            elif not (isinstance(ppl, float) and math.isfinite(ppl) and ppl >= 1.0):
                problems.append(f"{name}/{lang}: perplexity {ppl!r}")
            elif not math.isclose(ppl, math.exp(result["nll_sum"] / tokens), rel_tol=1e-6):
                problems.append(f"{name}/{lang}: perplexity does not match nll_sum / predicted_tokens")
            elif not (
                math.isclose(math.fsum(result.get("block_nll", [])), result["nll_sum"], rel_tol=1e-9)
                and sum(result.get("block_tokens", [])) == tokens
            ):
                problems.append(f"{name}/{lang}: the blocks do not add up to nll_sum and predicted_tokens")
            elif not (
                math.isclose(math.fsum(result.get("document_nll", [])), result["nll_sum"], rel_tol=1e-9)
                and sum(result.get("document_tokens", [])) == tokens
                and len(result.get("document_ids", [])) == len(result["document_nll"])
            ):
                problems.append(f"{name}/{lang}: the documents do not add up to nll_sum and predicted_tokens")
            elif not _contains(result.get("interval"), ppl):
                problems.append(f"{name}/{lang}: interval {result.get('interval')} does not contain the perplexity")

    table = (report_dir / "perplexity.md").read_text() if (report_dir / "perplexity.md").is_file() else ""
    problems += [f"perplexity.md has no row for {name}" for name in perplexity.get("models", {}) if f"| {name} |" not in table]

    if moe_models:
        try:
            routing = json.loads((report_dir / "routing.json").read_text())
        except (OSError, json.JSONDecodeError) as error:
            return problems + [f"routing.json unreadable: {error}"]
        for name in moe_models:
            entry = routing.get(name)
            if entry is None:
                problems.append(f"routing.json has no entry for MoE model {name}")
                continue
            # How much each layer uses the original FFN: MoE-LPR's expert-0 share, MoE-CT's fusion weight.
            ffn_key = FFN_FUSION_WEIGHT_KEY if entry.get("method") == "ct" else EXPERT0_TOP1_SHARE_KEY
            for lang in report_languages:
                stats = entry["languages"].get(lang, {})
                ffn_use, probs = stats.get(ffn_key, []), stats.get(MEAN_ROUTER_PROB_KEY, [])
                top1 = stats.get(TOP1_SHARE_KEY, [])
                if not len(ffn_use) == len(probs) == len(top1) == len(entry["layers"]):
                    problems.append(f"{name}/{lang}: routing has not one value per MoE layer")
                elif not all(0.0 <= s <= 1.0 for s in ffn_use):
                    problems.append(f"{name}/{lang}: {ffn_key} outside [0, 1]")
                elif not [len(p) for p in probs] == [len(t) for t in top1] == _experts_per_layer(entry):
                    problems.append(f"{name}/{lang}: router probabilities do not list each layer's experts")
                elif not all(math.isclose(sum(p), 1.0, rel_tol=1e-3) for p in probs):
                    problems.append(f"{name}/{lang}: router probabilities do not sum to 1 over the experts")
                elif not all(math.isclose(sum(t), 1.0, rel_tol=1e-6) for t in top1):
                    problems.append(f"{name}/{lang}: top-1 shares do not sum to 1 over the experts")
        _check_png(report_dir / "routing_heatmap.png", problems)
    if runs:
        _check_png(report_dir / "loss_curves.png", problems)
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelpr_lab.eval_report_check", description=__doc__)
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--models", type=_csv, default=[], help="models that must be in the report")
    parser.add_argument("--languages", type=_csv, default=[], help="languages that must be in the report")
    parser.add_argument("--runs", action="store_true", help="loss_curves.png must exist")
    args = parser.parse_args(argv)
    problems = check_report(args.report_dir, args.models, args.languages, args.runs)
    for problem in problems:
        print(f"{args.report_dir}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.report_dir}: report complete and well formed")
    return 1 if problems else 0


def _contains(interval: list[float] | None, value: float) -> bool:
    """Whether ``interval`` holds ``value`` up to float rounding (a one-document bootstrap collapses to a point
    that is the perplexity computed along another path)."""
    if not interval:
        return False
    low, high = interval[0], interval[-1]
    return (low <= value <= high) or math.isclose(value, low, rel_tol=1e-9) or math.isclose(value, high, rel_tol=1e-9)


if __name__ == "__main__":
    sys.exit(main())
