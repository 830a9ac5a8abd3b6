"""``moelpr bench``: the MoE-LPR paper's accuracy table (its Table 1) for a model, with lm-eval 0.4.13.

Per benchmark family and language, lm-eval's score with the authors' shot counts (ARC-Challenge 25, HellaSwag 10,
MMLU 5, Belebele 5), FLORES translation X->en and en->X (chrF; task files of ours over FLORES-200 / FLORES+,
which lm-eval ships none of for these languages) and, with ``--helppage_tasks``, the help-page tasks that
``moelpr corpora --lm_eval_tasks`` writes. Then the paper's layout: the average over the expanded (new) languages
and over the original (old) ones, per benchmark and over benchmarks; with ``--baseline``, the change against the
baseline and the share of the baseline's original-language score kept. Writes ``bench.md``, ``bench.json`` and
``bench.png`` to ``--output_dir``.

Offline: lm-eval reads its datasets from the Hugging Face datasets cache (``HF_DATASETS_OFFLINE=1`` is set). A task
that lm-eval 0.4.13 does not have for a language, or whose data is absent, is named in one line and left out of
the averages, for every model, so that the averages compare the same cells.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..extras import MissingExtraError, require
from .intervals import MismatchedDocuments
from .lm_eval_tasks import LANGUAGES, MAX_GENERATED_TOKENS, TRANSLATION_SHOTS, write_translation_task
from .score_intervals import ModelItems, change_intervals

logger = logging.getLogger(__name__)

EXAMPLE = (
    "example: moelpr bench --model_path saves/moelpr/stage2 --baseline work/models/base --new hu,tr,el "
    "--old en,es,zh --output_dir work/bench"
)


@dataclass(frozen=True)
class Benchmark:
    label: str
    shots: int | None  # None: the task file's own (our generated tasks carry theirs)
    metric: str  # lm-eval's metric key, without the filter suffix
    tasks: Mapping[str, str] = field(default_factory=dict)  # language -> lm-eval task name


# The task names lm-eval 0.4.13 has for the paper's languages (okapi's translations where they exist, then the
# machine-translated ARC and Global-MMLU); languages missing here have no task in that version.
BENCHMARKS = {
    "arc": Benchmark("ARC-Challenge", 25, "acc_norm", {
        "en": "arc_challenge", "es": "arc_es", "zh": "arc_zh", "hu": "arc_hu", "el": "arc_challenge_mt_el"}),
    "hellaswag": Benchmark("HellaSwag", 10, "acc_norm", {
        "en": "hellaswag", "es": "hellaswag_es", "hu": "hellaswag_hu"}),
    "mmlu": Benchmark("MMLU", 5, "acc", {
        "en": "mmlu", "es": "m_mmlu_es", "zh": "m_mmlu_zh", "hu": "m_mmlu_hu", "tr": "global_mmlu_full_tr",
        "el": "global_mmlu_full_el"}),
    "belebele": Benchmark("Belebele", 5, "acc", {
        code: f"belebele_{flores}" for code, (_, flores) in LANGUAGES.items()}),
}
FLORES_X_EN, FLORES_EN_X = "flores_x_en", "flores_en_x"
FLORES_HF = "openlanguagedata/flores_plus"  # FLORES+ on the Hugging Face hub: one config per language, dev/devtest
HELPPAGES = {
    "help_completion": ("Help pages: completion", "acc_norm", "helppages_completion_{code}"),
    "help_x_en": ("Help pages: X->en chrF", "chrf", "helppages_translate_{code}_en"),
    "help_en_x": ("Help pages: en->X chrF", "chrf", "helppages_translate_en_{code}"),
}


# What ``--benchmarks`` chooses from: the paper's (or --task_map's) benchmarks, FLORES, the help-page tasks.
GROUPS = ("paper", "flores", "helppages")
BASELINE = "baseline"  # the baseline's name in the report


class UsageError(ValueError):
    """A mistake in the command line, reported as one line."""


def _codes(value: str) -> list[str]:
    return [code.strip() for code in value.split(",") if code.strip()]


def _named_path(value: str) -> tuple[str, Path]:
    name, separator, path = value.rpartition("=")
    return (name, Path(path)) if separator and name else ("model", Path(value))


def _flores_sentences(code: str, flores_dir: Path | None) -> dict[str, list[str]] | None:
    """``{"dev": [...], "devtest": [...]}`` of one language: from a FLORES-200 directory (``dev/hun_Latn.dev``,
    ``devtest/hun_Latn.devtest``) or else the FLORES+ copy in the Hugging Face datasets cache; None if absent."""
    flores = LANGUAGES.get(code, (None, None))[1]
    if flores is None:
        return None
    if flores_dir is not None:
        files = {split: flores_dir / split / f"{flores}.{split}" for split in ("dev", "devtest")}
        if not all(path.is_file() for path in files.values()):
            return None
        return {split: path.read_text(encoding="utf-8").splitlines() for split, path in files.items()}
    try:
        import datasets

        data = datasets.load_dataset(FLORES_HF, flores)
        return {split: list(data[split]["text"]) for split in ("dev", "devtest")}
    except Exception:  # noqa: BLE001 - any failure to read the cache means the data is absent offline
        return None


def write_flores_tasks(codes: Sequence[str], out: Path, flores_dir: Path | None, limit: int | None) -> dict[str, dict]:
    """Translation tasks X->en and en->X for every non-English code with FLORES data: the devtest sentences are
    scored, the first dev sentences are the prompt's examples. Returns benchmark -> language -> task name."""
    english = _flores_sentences("en", flores_dir)
    tasks: dict[str, dict] = {FLORES_X_EN: {}, FLORES_EN_X: {}}
    for code in codes:
        if code == "en":
            continue
        other = _flores_sentences(code, flores_dir) if english else None
        if other is None:
            continue
        pairs = {split: [{"en": e, code: x} for e, x in zip(english[split], other[split])] for split in english}
        test = pairs["devtest"][:limit] if limit else pairs["devtest"]
        for benchmark, source, target in ((FLORES_X_EN, code, "en"), (FLORES_EN_X, "en", code)):
            as_docs = [[{"source": p[source], "target": p[target]} for p in split] for split in (test, pairs["dev"])]
            name = f"moelpr_flores_{source}_{target}"
            tasks[benchmark][code] = write_translation_task(out, name, source, target, as_docs[0],
                                                            as_docs[1][:TRANSLATION_SHOTS])
    return tasks


@dataclass
class Plan:
    """Which lm-eval task gives each (benchmark, language) cell, and what cannot be measured, with why."""

    benchmarks: dict[str, Benchmark]
    missing: list[str]  # one line each


def plan(new: Sequence[str], old: Sequence[str], task_dir: Path, flores_dir: Path | None, helppage_tasks: Path | None,
         task_map: Mapping[str, Mapping] | None, limit: int | None, groups: Sequence[str] = GROUPS) -> Plan:
    """``groups``: which of :data:`GROUPS` to run (the help pages only with ``helppage_tasks``)."""
    languages = [*new, *old]
    missing = []
    benchmarks: dict[str, Benchmark] = {}
    chosen = BENCHMARKS if task_map is None else {
        key: Benchmark(entry.get("label", key), entry.get("shots"), entry["metric"], entry["tasks"])
        for key, entry in task_map.items()}
    for key, benchmark in (chosen if "paper" in groups else {}).items():
        benchmarks[key] = benchmark
        missing += [f"{benchmark.label} / {lang}: lm-eval 0.4.13 has no task for this language; left out"
                    for lang in languages if lang not in benchmark.tasks]
    flores = write_flores_tasks(languages, task_dir, flores_dir, limit) if "flores" in groups else {}
    for key, label in ((FLORES_X_EN, "FLORES X->en chrF"), (FLORES_EN_X, "FLORES en->X chrF")):
        if key not in flores:
            continue
        benchmarks[key] = Benchmark(label, None, "chrf", flores[key])
        missing += [f"{label} / {lang}: no FLORES data (give --flores_dir or fill the HF datasets cache with "
                    f"{FLORES_HF}); left out" for lang in languages if lang != "en" and lang not in flores[key]]
    if helppage_tasks is not None and "helppages" in groups:
        for key, (label, metric, pattern) in HELPPAGES.items():
            tasks = {}
            for lang in languages:
                name = pattern.format(code=lang)
                if (helppage_tasks / f"{name}.yaml").is_file():
                    tasks[lang] = name
                elif not (key != "help_completion" and lang == "en"):
                    missing.append(f"{label} / {lang}: no task {name} in {helppage_tasks}; left out")
            benchmarks[key] = Benchmark(label, None, metric, tasks)
    return Plan(benchmarks, missing)


def _score(results: Mapping, task: str, metric: str) -> float | None:
    for section in ("groups", "results"):
        entry = results.get(section, {}).get(task, {})
        for key in (f"{metric},none", metric):
            if key in entry and isinstance(entry[key], (int, float)):
                value = float(entry[key])
                return value if metric.startswith("chrf") else 100 * value  # accuracies in percent, as the paper
    return None


def _task_items(results: Mapping, task: str, metric: str) -> dict[str, list] | None:
    """Each scored item's id and result (score_intervals.TaskItems), in document order; ``None`` where lm-eval
    logged none under the task's name (a group of subtasks, such as MMLU's)."""
    samples = sorted(results.get("samples", {}).get(task, []), key=lambda sample: sample["doc_id"])
    if not samples or not all(metric in sample for sample in samples):
        return None
    return {"ids": [sample["doc_hash"] for sample in samples], "values": [sample[metric] for sample in samples]}


def run_model(
    model_path: Path, plan_: Plan, include_paths: Sequence[Path], device: str, batch_size: int | str, dtype: str,
    limit: int | None, max_gen_toks: int | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, list]]], list[str]]:
    """Scores of one model, benchmark -> language -> score; the scored items the same way (for the intervals); and
    one line per task that could not run. ``max_gen_toks`` caps the translations' generated tokens (default: the
    task files' own)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import moelpr  # noqa: F401  (registers the MoE-LPR model types)

    manager = TaskManager(include_path=[str(p) for p in include_paths])
    known = set(manager.all_tasks)
    model = HFLM(pretrained=str(model_path), device=device, batch_size=batch_size, dtype=dtype)
    gen_kwargs = None if max_gen_toks is None else {"max_gen_toks": max_gen_toks}
    scores: dict[str, dict[str, float]] = {}
    items: dict[str, dict[str, dict[str, list]]] = {}
    failed = []
    for key, benchmark in plan_.benchmarks.items():
        for lang, task in benchmark.tasks.items():
            if task not in known:
                failed.append(f"{benchmark.label} / {lang}: lm-eval has no task {task}; left out")
                continue
            try:
                results = lm_eval.simple_evaluate(model=model, tasks=[task], num_fewshot=benchmark.shots,
                                                  task_manager=manager, limit=limit, log_samples=True,
                                                  bootstrap_iters=0, gen_kwargs=gen_kwargs)
            except Exception as error:  # noqa: BLE001 - absent data surfaces as many exception types
                first_line = (str(error).strip().splitlines() or [""])[0][:200]
                failed.append(f"{benchmark.label} / {lang}: {task} could not run ({type(error).__name__}: "
                              f"{first_line}); left out")
                continue
            score = _score(results, task, benchmark.metric)
            if score is None:
                failed.append(f"{benchmark.label} / {lang}: {task} gave no {benchmark.metric}; left out")
            else:
                scores.setdefault(key, {})[lang] = score
                task_items = _task_items(results, task, benchmark.metric)
                if task_items is not None:
                    items.setdefault(key, {})[lang] = task_items
                logger.info("%s / %s (%s): %.2f", benchmark.label, lang, task, score)
    del model
    return scores, items, failed


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def layout(scores: Mapping[str, Mapping[str, Mapping[str, float]]], benchmarks: Mapping[str, Benchmark],
           new: Sequence[str], old: Sequence[str], baseline: str | None, items: ModelItems | None = None) -> dict:
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
        table["benchmarks"][key] = {"label": benchmark.label, "metric": benchmark.metric, "shots": benchmark.shots,
                                    "languages": common}
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
                    entry["vs_baseline"][group] = {"change": entry[group] - base[group],
                                                   "kept": entry[group] / base[group] if base[group] else None}
        if items is not None:
            _add_intervals(table, items, new, old, baseline)
    return table


def _add_intervals(table: dict, items: ModelItems, new: Sequence[str], old: Sequence[str], baseline: str) -> None:
    groups = {}
    for key, entry in table["benchmarks"].items():
        if all(items.get(m, {}).get(key, {}).get(lang) for m in table["models"] for lang in entry["languages"]):
            groups[key] = {"expanded": [lang for lang in entry["languages"] if lang in new],
                           "original": [lang for lang in entry["languages"] if lang in old]}
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
                for group, bounds in by_group.items()}
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


def markdown(table: Mapping, new: Sequence[str], old: Sequence[str], baseline: str | None, missing: Sequence[str],
             limit: int | None) -> str:
    models = list(table["models"])
    lines = ["# Benchmark accuracy in the MoE-LPR paper's layout", ""]
    if limit:
        lines += [f"**Each task limited to its first {limit} documents**: not the benchmark's own score, and noisier "
                  "the fewer documents are scored.", ""]
    lines += ["Accuracies in percent (ARC and HellaSwag: length-normalised), translation in chrF (0-100); "
              f"expanded = mean over {', '.join(new)}, original = mean over {', '.join(old)}, over the languages "
              "each benchmark has.", ""]
    keys = list(table["benchmarks"])
    header = ["model", *(f"{table['benchmarks'][k]['label']} exp. / orig." for k in keys), "expanded", "original"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for m in models:
        entry = table["models"][m]
        cells = [f"{_fmt(entry['benchmarks'][k]['expanded'])} / {_fmt(entry['benchmarks'][k]['original'])}"
                 for k in keys]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(entry['expanded'])} | {_fmt(entry['original'])} |")
    if baseline is not None and len(models) > 1:
        lines += ["", f"Against `{baseline}`: change in points (in brackets its 95% interval, paired bootstrap over "
                  "the scored items), and the share of its score kept:", "",
                  "| model | expanded change | expanded kept | original change | original kept |",
                  "|---|---:|---:|---:|---:|"]
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
        lines += [f"**{table['benchmarks'][k]['label']}** ({shots_text})", "",
                  "| model | " + " | ".join(f"{lang} ({'new' if lang in new else 'old'})" for lang in langs) + " |",
                  "|---|" + "---:|" * len(langs)]
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
        ax.set_xticks(np.arange(len(keys)) + width * (len(models) - 1) / 2,
                      [table["benchmarks"][k]["label"] for k in keys], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{group} languages")
        ax.set_ylabel("accuracy % / chrF")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moelpr bench", description=__doc__.split("\n\n")[0], epilog=EXAMPLE)
    parser.add_argument("--model_path", type=_named_path, action="append", required=True, metavar="[NAME=]PATH",
                        help="a checkpoint to evaluate; repeat as NAME=PATH for several (one table, the baseline "
                             "evaluated once)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkpoint to compare with (e.g. the base model)")
    parser.add_argument("--new", type=_codes, default=_codes("hu,tr,el"), help="expanded languages (default hu,tr,el)")
    parser.add_argument("--old", type=_codes, default=_codes("en,es,zh"), help="original languages (default en,es,zh)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--flores_dir", type=Path, default=None,
                        help="a FLORES-200 directory (dev/, devtest/); default: FLORES+ from the HF datasets cache")
    parser.add_argument("--helppage_tasks", type=Path, default=None,
                        help="the task folder `moelpr corpora --lm_eval_tasks` wrote (CORPORA/lm_eval_tasks)")
    parser.add_argument("--task_map", type=Path, default=None,
                        help="JSON {benchmark: {label, shots, metric, tasks: {lang: task}}} replacing the paper's "
                             "benchmarks (with --include_path for task files of your own)")
    parser.add_argument("--include_path", type=Path, action="append", default=[], help="more lm-eval task folders")
    parser.add_argument("--benchmarks", type=_codes, default=list(GROUPS),
                        help="which to run, from paper (ARC, HellaSwag, MMLU, Belebele or --task_map's), flores, "
                             "helppages (with --helppage_tasks); default: all")
    parser.add_argument("--limit", type=int, default=None,
                        help="score only the first N documents of each task (the table says so)")
    parser.add_argument("--max_gen_toks", type=int, default=None,
                        help=f"cap on the tokens generated per translation (default {MAX_GENERATED_TOKENS})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", default="8")
    parser.add_argument("--dtype", default="float32", help="torch dtype of the models (bfloat16 on GPUs)")
    return parser.parse_args(argv)


def _validated(args: argparse.Namespace) -> dict | None:
    for option, path in (*(("--model_path", p) for _, p in args.model_path), ("--baseline", args.baseline)):
        if path is not None and not (path / "config.json").is_file():
            raise UsageError(f"{option}: {path} is not a checkpoint directory (no config.json)")
    names = [name for name, _ in args.model_path]
    odd = [name for name in names if not re.fullmatch(r"[\w.-]+", name)]
    if odd:
        raise UsageError(f"--model_path: name {odd[0]!r} must be letters, digits, '_', '.' or '-' (it names a file)")
    repeated = sorted({name for name in names if names.count(name) > 1} | ({BASELINE} & set(names)))
    if repeated:
        raise UsageError(f"--model_path: the name {repeated[0]} is given twice (or is the baseline's); name each "
                         "model once, as NAME=PATH")
    unknown = sorted(set(args.benchmarks) - set(GROUPS))
    if unknown or not args.benchmarks:
        raise UsageError(f"--benchmarks: choose from {', '.join(GROUPS)} (got {','.join(unknown) or 'none'})")
    if args.benchmarks == ["helppages"] and args.helppage_tasks is None:
        raise UsageError("--benchmarks helppages needs --helppage_tasks (the folder `moelpr corpora --lm_eval_tasks` "
                         "writes)")
    overlap = sorted(set(args.new) & set(args.old))
    if overlap:
        raise UsageError(f"{', '.join(overlap)} is given as both new and old")
    if not args.new and not args.old:
        raise UsageError("no languages: give --new and/or --old")
    for option, path in (("--flores_dir", args.flores_dir), ("--helppage_tasks", args.helppage_tasks),
                         *(("--include_path", p) for p in args.include_path)):
        if path is not None and not path.is_dir():
            raise UsageError(f"{option}: directory not found: {path}")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.max_gen_toks is not None and args.max_gen_toks < 1:
        raise UsageError("--max_gen_toks must be at least 1")
    if args.task_map is None:
        return None
    try:
        task_map = json.loads(args.task_map.read_text())
        if not all("metric" in entry and "tasks" in entry for entry in task_map.values()):
            raise ValueError("every benchmark needs metric and tasks")
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError(f"--task_map {args.task_map}: {error}") from None
    return task_map


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require("eval", purpose="moelpr bench")  # lm-eval scores, sacrebleu's chrF intervals, matplotlib's chart
        task_map = _validated(args)
    except (UsageError, MissingExtraError) as error:
        print(f"moelpr bench: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[moelpr.bench] %(message)s")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    task_dir = args.output_dir / "tasks"
    task_dir.mkdir(exist_ok=True)
    plan_ = plan(args.new, args.old, task_dir, args.flores_dir, args.helppage_tasks, task_map, args.limit,
                 args.benchmarks)
    include = [task_dir, *([args.helppage_tasks] if args.helppage_tasks else []), *args.include_path]
    models = {**({BASELINE: args.baseline} if args.baseline else {}), **dict(args.model_path)}
    scores: dict[str, dict] = {}
    items: dict[str, dict] = {}
    missing = list(plan_.missing)
    batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    for name, path in models.items():
        # A model's scores are kept as soon as it is done, so that a stopped run of several models resumes.
        settings = {"path": str(path), "modified": (path / "config.json").stat().st_mtime_ns,
                    "tasks": {k: dict(b.tasks) for k, b in plan_.benchmarks.items()},
                    "limit": args.limit, "max_gen_toks": args.max_gen_toks, "dtype": args.dtype}
        saved = args.output_dir / "scores" / f"{name}.json"
        done = json.loads(saved.read_text()) if saved.is_file() else None
        if done is not None and done["settings"] == settings and "items" in done:
            logger.info("%s: scores of an earlier run with the same settings (%s)", name, saved)
            scores[name], items[name], failed = done["scores"], done["items"], done["failed"]
        else:
            scores[name], items[name], failed = run_model(path, plan_, include, args.device, batch_size, args.dtype,
                                                          args.limit, args.max_gen_toks)
            saved.parent.mkdir(exist_ok=True)
            partial = saved.with_suffix(".partial")
            kept = {"settings": settings, "scores": scores[name], "items": items[name], "failed": failed}
            partial.write_text(json.dumps(kept, ensure_ascii=False) + "\n")
            partial.replace(saved)
        missing += [f"{name}: {line}" for line in failed]
    for line in missing:
        print(f"moelpr bench: {line}", file=sys.stderr)
    try:
        table = layout(scores, plan_.benchmarks, args.new, args.old, BASELINE if args.baseline else None, items)
    except MismatchedDocuments as error:
        print(f"moelpr bench: error: {error}", file=sys.stderr)
        return 1
    if not table["benchmarks"]:
        print("moelpr bench: error: no benchmark could be run (see the lines above)", file=sys.stderr)
        return 1
    report = {"checkpoints": {name: str(path) for name, path in models.items()}, "new": args.new, "old": args.old,
              "limit": args.limit, "scores": scores, "missing": missing, **table}
    (args.output_dir / "bench.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    text = markdown(table, args.new, args.old, BASELINE if args.baseline else None, missing, args.limit)
    (args.output_dir / "bench.md").write_text(text)
    plot(table, args.output_dir / "bench.png")
    print(text)
    print(f"Report written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
