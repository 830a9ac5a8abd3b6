"""The report of ``moelpr bench`` in the MoE-LPR paper's layout: per benchmark the average over the expanded (new)
and the original (old) languages, over benchmarks the mean of those, the change against a baseline with its paired
bootstrap interval, as ``bench.json``, ``bench.md`` and ``bench.png``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .bench import Benchmark, BenchScores, BenchSettings
from .errors import EvaluationError
from .score_intervals import ModelItems, change_intervals


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def layout(
    scores: Mapping[str, Mapping[str, Mapping[str, float]]],
    benchmarks: Mapping[str, Benchmark],
    new: Sequence[str],
    old: Sequence[str],
    baseline: str | None,
    items: ModelItems | None = None,
) -> dict:
    """The paper's layout from ``model -> benchmark -> language -> score``. Only cells every model has enter the
    averages; per benchmark the mean over its expanded and over its original languages, and over benchmarks the
    mean of those per-benchmark means. With ``baseline``: every other model's change (points) and the share of the
    baseline kept (model / baseline); with ``items`` (the scored items, same nesting) also the change's paired
    bootstrap interval, per benchmark where every model has its items, and overall where every benchmark has."""
    models = list(scores)
    table: dict = {"benchmarks": {}, "models": {m: {"benchmarks": {}} for m in models}}
    for key, benchmark in benchmarks.items():
        common = [lang for lang in (*new, *old) if all(lang in scores[m].get(key, {}) for m in models)]
        if not common:
            continue
        table["benchmarks"][key] = {
            "label": benchmark.label,
            "metric": benchmark.metric,
            "shots": benchmark.shots,
            "languages": common,
        }
        for m in models:
            cells = {lang: scores[m][key][lang] for lang in common}
            table["models"][m]["benchmarks"][key] = {
                "languages": cells,
                "expanded": _mean([cells[lang] for lang in common if lang in new]),
                "original": _mean([cells[lang] for lang in common if lang in old]),
            }
    for m in models:
        entries = table["models"][m]["benchmarks"].values()
        for group in ("expanded", "original"):
            table["models"][m][group] = _mean([e[group] for e in entries if e[group] is not None])
    if baseline is not None:
        base = table["models"][baseline]
        for m in models:
            if m == baseline:
                continue
            entry = table["models"][m]
            entry["vs_baseline"] = {}
            for group in ("expanded", "original"):
                if entry[group] is not None and base[group] is not None:
                    entry["vs_baseline"][group] = {
                        "change": entry[group] - base[group],
                        "kept": entry[group] / base[group] if base[group] else None,
                    }
        if items is not None:
            _add_intervals(table, items, new, old, baseline)
    return table


def _add_intervals(table: dict, items: ModelItems, new: Sequence[str], old: Sequence[str], baseline: str) -> None:
    groups = {}
    for key, entry in table["benchmarks"].items():
        if all(items.get(m, {}).get(key, {}).get(lang) for m in table["models"] for lang in entry["languages"]):
            groups[key] = {
                "expanded": [lang for lang in entry["languages"] if lang in new],
                "original": [lang for lang in entry["languages"] if lang in old],
            }
    if not groups:
        return
    metrics = {key: table["benchmarks"][key]["metric"] for key in groups}
    intervals = change_intervals({m: items[m] for m in table["models"]}, metrics, groups, baseline)
    for m, found in intervals.items():
        entry = table["models"][m]
        for key, by_group in found["benchmarks"].items():
            base_cells = table["models"][baseline]["benchmarks"][key]
            entry["benchmarks"][key]["vs_baseline"] = {
                group: {"change": entry["benchmarks"][key][group] - base_cells[group], "interval": list(bounds)}
                for group, bounds in by_group.items()
            }
        if len(groups) == len(table["benchmarks"]):
            for group in ("expanded", "original"):
                if group in found and group in entry["vs_baseline"]:
                    entry["vs_baseline"][group]["interval"] = list(found[group])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _change(versus: Mapping) -> str:
    """A change in points, with its paired 95% interval where the items were kept."""
    if "interval" not in versus:
        return f"{versus['change']:+.2f}"
    low, high = versus["interval"]
    return f"{versus['change']:+.2f} [{low:+.2f}, {high:+.2f}]"


def markdown(
    table: Mapping,
    new: Sequence[str],
    old: Sequence[str],
    baseline: str | None,
    missing: Sequence[str],
    limit: int | None,
) -> str:
    models = list(table["models"])
    lines = ["# Benchmark accuracy in the MoE-LPR paper's layout", ""]
    if limit:
        lines += [
            f"**Each task limited to its first {limit} documents**: not the benchmark's own score, and noisier "
            "the fewer documents are scored.",
            "",
        ]
    lines += [
        "Accuracies in percent (ARC and HellaSwag: length-normalised), translation in chrF (0-100); "
        f"expanded = mean over {', '.join(new)}, original = mean over {', '.join(old)}, over the languages "
        "each benchmark has.",
        "",
    ]
    keys = list(table["benchmarks"])
    header = ["model", *(f"{table['benchmarks'][k]['label']} exp. / orig." for k in keys), "expanded", "original"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for m in models:
        entry = table["models"][m]
        cells = [
            f"{_fmt(entry['benchmarks'][k]['expanded'])} / {_fmt(entry['benchmarks'][k]['original'])}" for k in keys
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(entry['expanded'])} | {_fmt(entry['original'])} |")
    if baseline is not None and len(models) > 1:
        lines += [
            "",
            f"Against `{baseline}`: change in points (in brackets its 95% interval, paired bootstrap over "
            "the scored items), and the share of its score kept:",
            "",
            "| model | expanded change | expanded kept | original change | original kept |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in models:
            if m == baseline:
                continue
            versus = table["models"][m]["vs_baseline"]
            cells = []
            for group in ("expanded", "original"):
                if group in versus:
                    kept = versus[group]["kept"]
                    cells += [_change(versus[group]), "-" if kept is None else f"{100 * kept:.1f}%"]
                else:
                    cells += ["-", "-"]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Per language:", ""]
    for k in keys:
        langs = table["benchmarks"][k]["languages"]
        shots = table["benchmarks"][k]["shots"]
        shots_text = "shots as in the task file" if shots is None else f"{shots}-shot"
        lines += [
            f"**{table['benchmarks'][k]['label']}** ({shots_text})",
            "",
            "| model | " + " | ".join(f"{lang} ({'new' if lang in new else 'old'})" for lang in langs) + " |",
            "|---|" + "---:|" * len(langs),
        ]
        for m in models:
            cells = table["models"][m]["benchmarks"][k]["languages"]
            lines.append(f"| {m} | " + " | ".join(_fmt(cells[lang]) for lang in langs) + " |")
        lines.append("")
    if missing:
        lines += ["Left out of the averages:", "", *(f"- {line}" for line in missing), ""]
    return "\n".join(lines)


def plot(table: Mapping, path: Path) -> None:
    """Expanded and original averages per benchmark, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(table["benchmarks"])
    models = list(table["models"])
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(keys) + 3), 4.5), layout="constrained", squeeze=False)
    width = 0.8 / max(len(models), 1)
    for ax, group in zip(axes[0], ("expanded", "original")):
        for index, m in enumerate(models):
            values = [table["models"][m]["benchmarks"][k][group] for k in keys]
            ax.bar(np.arange(len(keys)) + index * width, [np.nan if v is None else v for v in values], width, label=m)
        ax.set_xticks(
            np.arange(len(keys)) + width * (len(models) - 1) / 2,
            [table["benchmarks"][k]["label"] for k in keys],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_title(f"{group} languages")
        ax.set_ylabel("accuracy % / chrF")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(scored: BenchScores, output_dir: Path, settings: BenchSettings) -> str:
    """The paper's layout of ``scored``, written to ``output_dir`` as ``bench.json``, ``bench.md`` and
    ``bench.png``; returns the markdown. Refuses kept items of other documents than the baseline's and a run in which
    no benchmark could be measured."""
    table = layout(scored.scores, scored.benchmarks, settings.new, settings.old, scored.baseline, scored.items)
    if not table["benchmarks"]:
        raise EvaluationError("no benchmark could be run (see the lines above)")
    report = {
        "checkpoints": {name: str(path) for name, path in scored.checkpoints.items()},
        "new": settings.new,
        "old": settings.old,
        "limit": settings.limit,
        "scores": scored.scores,
        "missing": scored.missing,
        **table,
    }
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    text = markdown(table, settings.new, settings.old, scored.baseline, scored.missing, settings.limit)
    (output_dir / "bench.md").write_text(text)
    plot(table, output_dir / "bench.png")
    return text
