"""The methods comparison: one table and one trade-off picture from a ``moelpr eval`` report and each method's
training runs (``scripts/compare.sh`` writes both; see docs/comparison.md).

``python -m moelpr_lab.comparison --eval_dir DIR --methods METHODS.json --output_dir OUT``

``METHODS.json`` names the evaluated base model and full continual training (the reference of the gain share),
and for every method the model's name in the report, the LLaMA-Factory output directories of its training
stages and their console logs (LLaMA-Factory logs ``trainable params: N || all params: M`` there)::

    {"base": "base", "reference": "full_ft",
     "methods": [{"name": "moelpr", "label": "MoE-LPR", "runs": ["saves/stage1", "saves/stage2"],
                  "logs": ["logs/stage1.log", "logs/stage2.log"], "seeds": ["moelpr_seed2", "moelpr_seed3"]}, ...]}

``seeds`` (optional) names the models of the same method trained again with other seeds: the table then shows the
spread of the mean changes over all of the method's seeds beside the first seed's interval, since an interval over
held-out documents says nothing about the randomness of training.

``--bench DIR`` adds the accuracy columns: a ``moelpr bench`` output (``bench.json``) over the same models, named
as in the evaluation report (``--model_path NAME=PATH``), with the base model as its baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moelpr.checkpoints.slim import ComposedCheckpoint
from moelpr.evaluation.intervals import change_interval, document_units, gain_share_interval, mean_change_interval
from moelpr.models.moe import NEW_EXPERTS_NAME, ORIGINAL_EXPERT_NAME

TRAINABLE_LINE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)")
_EXPERT_TENSOR = re.compile(rf"\.layers\.(\d+)\..*\.({ORIGINAL_EXPERT_NAME}|{NEW_EXPERTS_NAME}\.\d+)\.")


class ComparisonError(ValueError):
    """A methods file or report that does not hold what the comparison needs."""


@dataclass
class MethodSpec:
    name: str  # the model's name in the evaluation report
    label: str
    runs: list[Path]
    logs: list[Path]


def trainable_parameters(logs: Sequence[Path]) -> int:
    """The largest ``trainable params`` count LLaMA-Factory logged over a method's stages (later stages of the
    methods compared train subsets of the first's)."""
    counts = []
    for log in logs:
        matches = TRAINABLE_LINE.findall(log.read_text(errors="replace"))
        if not matches:
            raise ComparisonError(f"{log} has no LLaMA-Factory 'trainable params' line")
        counts.append(int(matches[-1][0].replace(",", "")))
    return max(counts)


def parameter_counts(model_dir: Path) -> tuple[int, int]:
    """``(total, active per token)`` parameters of a checkpoint. A token runs ``top_k`` routed experts of an MoE
    layer (and, in MoE-CT, the frozen FFN beside them); the other routed experts are inactive."""
    config = json.loads((model_dir / "config.json").read_text())
    expert_params: dict[tuple[int, str], int] = {}
    total = 0
    with ComposedCheckpoint(model_dir) as reader:  # a slim checkpoint too
        for name in reader.names():
            if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            size = math.prod(reader.spec(name).shape)
            total += size
            match = _EXPERT_TENSOR.search(name)
            if match:
                key = (int(match.group(1)), match.group(2))
                expert_params[key] = expert_params.get(key, 0) + size
    inactive = 0
    top_k = config.get("num_experts_per_tok", 0)
    routes_original = config.get("moe_method", "lpr") != "ct"  # in MoE-CT the original FFN is always on
    for layer in sorted({layer for layer, _ in expert_params}):
        routed = [size for (at, expert), size in expert_params.items()
                  if at == layer and (routes_original or expert != ORIGINAL_EXPERT_NAME)]
        inactive += sum(sorted(routed)[: max(len(routed) - top_k, 0)])
    return total, total - inactive


def training_seconds(runs: Sequence[Path]) -> tuple[float, int]:
    """Training time and optimizer steps over a method's runs (LLaMA-Factory's ``trainer_state.json``)."""
    seconds, steps = 0.0, 0
    for run in runs:
        history = json.loads((run / "trainer_state.json").read_text())
        final = [entry for entry in history["log_history"] if "train_runtime" in entry]
        if not final:
            raise ComparisonError(f"{run}/trainer_state.json has no train_runtime: did the run finish?")
        seconds += final[-1]["train_runtime"]
        steps += history["global_step"]
    return seconds, steps


def compare(eval_dir: Path, methods_file: Path) -> dict:
    """Every figure of the comparison, per method (see the module docstring)."""
    report = json.loads((eval_dir / "perplexity.json").read_text())
    spec = json.loads(methods_file.read_text())
    models, languages = report["models"], report["languages"]
    base_name, reference_name = spec["base"], spec["reference"]
    seed_models = [n for m in spec["methods"] for n in [m["name"], *m.get("seeds", [])]]
    for name in (base_name, reference_name, *seed_models):
        if name not in models:
            raise ComparisonError(f"model {name!r} is not in {eval_dir}/perplexity.json")
    new = [lang for lang, role in languages.items() if role == "new"]
    old = [lang for lang, role in languages.items() if role == "old"]
    base = models[base_name]["languages"]
    reference = models[reference_name]["languages"]
    base_units = {lang: document_units(base[lang]) for lang in languages}
    rows = []
    for entry in spec["methods"]:
        method = MethodSpec(entry["name"], entry.get("label", entry["name"]), [Path(p) for p in entry["runs"]],
                            [Path(p) for p in entry["logs"]])
        cells = models[method.name]["languages"]
        units = {lang: document_units(cells[lang]) for lang in languages}
        per_language = {}
        for lang in languages:
            low, high = change_interval(base_units[lang], units[lang], paired=True)
            per_language[lang] = {
                "perplexity": cells[lang]["perplexity"],
                "interval": cells[lang]["interval"],
                "change": cells[lang]["perplexity"] / base[lang]["perplexity"] - 1,
                "change_interval": [low, high],
            }
            if lang in new:
                per_language[lang]["gain_share"] = list(
                    gain_share_interval(base_units[lang], document_units(reference[lang]), units[lang])
                )
        seed_changes = {}
        for seed_name in [method.name, *entry.get("seeds", [])]:
            seed_cells = models[seed_name]["languages"]
            seed_changes[seed_name] = {
                group: mean_change_interval([(base_units[lang], document_units(seed_cells[lang]))
                                             for lang in langs])[0]
                for group, langs in (("new", new), ("old", old))
            }
        seconds, steps = training_seconds(method.runs)
        total, active = parameter_counts(Path(models[method.name]["path"]))
        rows.append({
            "name": method.name,
            "label": method.label,
            "languages": per_language,
            "new_mean_change": list(mean_change_interval([(base_units[lang], units[lang]) for lang in new])),
            "old_mean_change": list(mean_change_interval([(base_units[lang], units[lang]) for lang in old])),
            "trainable_params": trainable_parameters(method.logs),
            "total_params": total,
            "active_params": active,
            "train_seconds": seconds,
            "train_steps": steps,
            "eval_tokens_per_second": models[method.name]["eval_tokens_per_second"],
            "seeds": seed_changes,  # mean new- and old-language change of each seed's model
        })
    base_total, _ = parameter_counts(Path(models[base_name]["path"]))
    return {"base": base_name, "base_path": models[base_name]["path"], "reference": reference_name, "new": new,
            "old": old, "base_params": base_total,
            "base_perplexity": {lang: base[lang]["perplexity"] for lang in languages}, "methods": rows,
            "settings": report["settings"]}


def add_accuracy(result: dict, bench_dir: Path) -> None:
    """Each method's (and the base model's) expanded and original averages per benchmark from ``moelpr bench``'s
    report, and the change against the base in points; methods the report lacks get none."""
    bench = json.loads((bench_dir / "bench.json").read_text())
    if "baseline" not in bench["models"]:
        raise ComparisonError(f"{bench_dir}/bench.json has no baseline; run moelpr bench with --baseline (the base)")
    if Path(bench["checkpoints"]["baseline"]).resolve() != Path(result["base_path"]).resolve():
        raise ComparisonError(f"{bench_dir}/bench.json's baseline is {bench['checkpoints']['baseline']}, not the "
                              f"base model {result['base_path']}")
    base = bench["models"]["baseline"]["benchmarks"]
    result["accuracy"] = {"benchmarks": {key: {"label": entry["label"], "languages": entry["languages"]}
                                         for key, entry in bench["benchmarks"].items()},
                          "base": {key: {g: base[key][g] for g in ("expanded", "original")} for key in base},
                          "limit": bench["limit"]}
    for row in result["methods"]:
        entry = bench["models"].get(row["name"])
        if entry is None:
            continue
        row["accuracy"] = {key: {group: entry["benchmarks"][key][group] for group in ("expanded", "original")}
                           for key in base}
        row["accuracy_intervals"] = {key: {group: versus["interval"] for group, versus in
                                           entry["benchmarks"][key].get("vs_baseline", {}).items()} for key in base}


def _accuracy_markdown(result: dict) -> list[str]:
    accuracy = result["accuracy"]
    columns = [(key, group) for key, entry in accuracy["benchmarks"].items() for group in ("expanded", "original")
               if accuracy["base"][key][group] is not None]
    names = {"expanded": "new", "original": "old"}
    sample = "every held-out item" if accuracy["limit"] is None else f"the first {accuracy['limit']} items of each task"
    lines = ["", f"Accuracy (`moelpr bench`, {sample}; completion: length-normalised accuracy in %, translation: chrF), "
             "the mean over the new and over the old languages each task has, and in brackets the change against "
             "the base model in points with its 95% interval (paired bootstrap over the scored items):", "",
             "| method | " + " | ".join(f"{accuracy['benchmarks'][k]['label']} ({names[g]})" for k, g in columns) + " |",
             "|---|" + "---:|" * len(columns),
             "| base model | " + " | ".join(f"{accuracy['base'][k][g]:.1f}" for k, g in columns) + " |"]
    for row in result["methods"]:
        if "accuracy" in row:
            cells = [f"{row['accuracy'][k][g]:.1f} ({row['accuracy'][k][g] - accuracy['base'][k][g]:+.1f}"
                     f"{_points_interval(row.get('accuracy_intervals', {}).get(k, {}).get(g))})" for k, g in columns]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return lines


def _points_interval(bounds: Sequence[float] | None) -> str:
    return "" if bounds is None else f" [{bounds[0]:+.1f}, {bounds[1]:+.1f}]"


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def percent_cell(value: float, low: float, high: float) -> str:
    """A relative change and its interval as a table cell, in percent; ``*`` where the interval excludes 0."""
    mark = "*" if low > 0 or high < 0 else ""
    return f"{100 * value:+.1f}%{mark} [{100 * low:+.1f}, {100 * high:+.1f}]"


def markdown(result: dict) -> str:
    new, old = result["new"], result["old"]
    level = round(100 * result["settings"]["bootstrap"]["level"])
    header = ["method", *(f"{lang} (new)" for lang in new), *(f"{lang} (old)" for lang in old)]
    lines = [
        "# Methods compared on the same data and token budget",
        "",
        f"Held-out perplexity (lower is better) [{level}% bootstrap interval over the held-out documents]; the base "
        f"model `{result['base']}`: " + ", ".join(f"{lang} {ppl:.2f}" for lang, ppl in result["base_perplexity"].items())
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for row in result["methods"]:
        cells = [f"{row['languages'][lang]['perplexity']:.2f} [{row['languages'][lang]['interval'][0]:.2f}, "
                 f"{row['languages'][lang]['interval'][1]:.2f}]" for lang in (*new, *old)]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Change against the base model [{level}% interval, paired over the same documents; `*`: the interval "
        "excludes 0], and the share of "
        f"`{result['reference']}`'s log-perplexity gain kept on each new language:",
        "",
        "| " + " | ".join(["method", *(f"{lang} change" for lang in (*new, *old)),
                         *(f"{lang} gain kept" for lang in new)]) + " |",
        "|---|" + "---:|" * (len(new) * 2 + len(old)),
    ]
    for row in result["methods"]:
        changes = [percent_cell(row["languages"][lang]["change"], *row["languages"][lang]["change_interval"])
                   for lang in (*new, *old)]
        kept = ["{:.0%} [{:.0%}, {:.0%}]".format(*row["languages"][lang]["gain_share"]) for lang in new]
        lines.append(f"| {row['label']} | " + " | ".join(changes + kept) + " |")
    if "accuracy" in result:
        lines += _accuracy_markdown(result)
    if any(len(row["seeds"]) > 1 for row in result["methods"]):
        lines += [
            "",
            "Training randomness: the mean changes of every seed's model (the first is the one above); a difference "
            "is real only when it holds across seeds and its interval excludes 0:",
            "",
            "| method | seeds | mean new-language change per seed | mean old-language change per seed |",
            "|---|---:|---|---|",
        ]
        for row in result["methods"]:
            runs = list(row["seeds"].values())
            lines.append(f"| {row['label']} | {len(runs)} | " + " | ".join(
                ", ".join(f"{100 * run[group]:+.1f}%" for run in runs)
                + f" (spread {100 * (max(r[group] for r in runs) - min(r[group] for r in runs)):.1f} points)"
                for group in ("new", "old")) + " |")
    lines += [
        "",
        "| method | mean new-language change | mean old-language change | trainable | total | active per token "
        "| train s/step | eval tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["methods"]:
        lines.append(
            f"| {row['label']} | {percent_cell(*row['new_mean_change'])} | {percent_cell(*row['old_mean_change'])} | "
            f"{_millions(row['trainable_params'])} | {_millions(row['total_params'])} | "
            f"{_millions(row['active_params'])} | {row['train_seconds'] / row['train_steps']:.2f} | "
            f"{row['eval_tokens_per_second']:.0f} |"
        )
    lines += [
        "",
        f"The base model has {_millions(result['base_params'])} parameters. Train s/step: training time over all of a "
        "method's stages divided by their optimizer steps; trainable: the most parameters any of its stages trains. "
        f"Evaluation in {result['settings']['dtype']}, blocks of {result['settings']['cutoff_len']} tokens.",
        "",
    ]
    return "\n".join(lines)


def tradeoff_plot(result: dict, path: Path) -> None:
    """Mean new-language change (x, negative = learned) against mean old-language change (y, positive = forgot),
    one point per method with its bootstrap intervals: the paper's way of showing the trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5), layout="constrained")
    for row in result["methods"]:
        x, x_low, x_high = (100 * v for v in row["new_mean_change"])
        y, y_low, y_high = (100 * v for v in row["old_mean_change"])
        ax.errorbar(x, y, xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]], fmt="o", capsize=3)
        # Beside the bar's right end, so that close points do not cover each other's labels.
        ax.annotate(row["label"], (x_high, y), textcoords="offset points", xytext=(5, 0), va="center", fontsize=9)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.margins(x=0.25)  # room for the labels right of the bars
    ax.set_xlabel(f"new languages ({', '.join(result['new'])}): mean perplexity change, %\n(left = learned more)")
    ax.set_ylabel(f"old languages ({', '.join(result['old'])}): mean perplexity change, %\n(up = forgot more)")
    ax.set_title("Learning the new languages against forgetting the old ones\n(bars: 95% bootstrap intervals)")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelpr_lab.comparison", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval_dir", type=Path, required=True, help="a moelpr eval output directory")
    parser.add_argument("--methods", type=Path, required=True, help="the methods file (see the module docstring)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--bench", type=Path, default=None, help="a moelpr bench output over the same models")
    args = parser.parse_args(argv)
    try:
        result = compare(args.eval_dir, args.methods)
        if args.bench is not None:
            add_accuracy(result, args.bench)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as error:
        print(f"comparison: error: {error}", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.output_dir / "comparison.md").write_text(table)
    tradeoff_plot(result, args.output_dir / "tradeoff.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
