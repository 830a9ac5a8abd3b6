"""``moelpr bench``: the MoE-LPR paper's accuracy table (its Table 1) for a model, with lm-eval 0.4.13.

Per benchmark family and language, lm-eval's score with the authors' shot counts (ARC-Challenge 25, HellaSwag 10,
MMLU 5, Belebele 5), FLORES translation X->en and en->X (chrF; task files of ours over FLORES-200 / FLORES+,
which lm-eval ships none of for these languages) and, with ``--helppage_tasks``, the help-page tasks that
the demo's corpora builder writes (``python -m moelpr_lab.corpora --lm_eval_tasks``, in the
repository's lab/). Then the paper's layout: the average over the expanded (new) languages
and over the original (old) ones, per benchmark and over benchmarks; with ``--baseline``, the change against the
baseline and the share of the baseline's original-language score kept. Writes ``bench.md``, ``bench.json`` and
``bench.png`` to ``--output_dir``. This module plans and scores; :mod:`.bench_report` lays out and writes the report.

Offline: lm-eval reads its datasets from the Hugging Face datasets cache (``HF_DATASETS_OFFLINE=1`` is set). A task
that lm-eval 0.4.13 does not have for a language, or whose data is absent, is named in one line and left out of
the averages, for every model, so that the averages compare the same cells.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .lm_eval_tasks import LANGUAGES, TRANSLATION_SHOTS, write_translation_task

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager  # the eval extra: imported when a model is scored

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    label: str
    shots: int | None  # None: the task file's own (our generated tasks carry theirs)
    metric: str  # lm-eval's metric key, without the filter suffix
    tasks: Mapping[str, str] = field(default_factory=dict)  # language -> lm-eval task name


# The task names lm-eval 0.4.13 has for the paper's languages (okapi's translations where they exist, then the
# machine-translated ARC and Global-MMLU); languages missing here have no task in that version.
BENCHMARKS = {
    "arc": Benchmark(
        "ARC-Challenge",
        25,
        "acc_norm",
        {"en": "arc_challenge", "es": "arc_es", "zh": "arc_zh", "hu": "arc_hu", "el": "arc_challenge_mt_el"},
    ),
    "hellaswag": Benchmark(
        "HellaSwag", 10, "acc_norm", {"en": "hellaswag", "es": "hellaswag_es", "hu": "hellaswag_hu"}
    ),
    "mmlu": Benchmark(
        "MMLU",
        5,
        "acc",
        {
            "en": "mmlu",
            "es": "m_mmlu_es",
            "zh": "m_mmlu_zh",
            "hu": "m_mmlu_hu",
            "tr": "global_mmlu_full_tr",
            "el": "global_mmlu_full_el",
        },
    ),
    "belebele": Benchmark(
        "Belebele", 5, "acc", {code: f"belebele_{flores}" for code, (_, flores) in LANGUAGES.items()}
    ),
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
            tasks[benchmark][code] = write_translation_task(
                out, name, source, target, as_docs[0], as_docs[1][:TRANSLATION_SHOTS]
            )
    return tasks


@dataclass
class Plan:
    """Which lm-eval task gives each (benchmark, language) cell, and what cannot be measured, with why."""

    benchmarks: dict[str, Benchmark]
    missing: list[str]  # one line each


def plan(
    new: Sequence[str],
    old: Sequence[str],
    task_dir: Path,
    flores_dir: Path | None,
    helppage_tasks: Path | None,
    task_map: Mapping[str, Mapping] | None,
    limit: int | None,
    groups: Sequence[str] = GROUPS,
) -> Plan:
    """``groups``: which of :data:`GROUPS` to run (the help pages only with ``helppage_tasks``)."""
    languages = [*new, *old]
    missing = []
    benchmarks: dict[str, Benchmark] = {}
    chosen = (
        BENCHMARKS
        if task_map is None
        else {
            key: Benchmark(entry.get("label", key), entry.get("shots"), entry["metric"], entry["tasks"])
            for key, entry in task_map.items()
        }
    )
    for key, benchmark in (chosen if "paper" in groups else {}).items():
        benchmarks[key] = benchmark
        missing += [
            f"{benchmark.label} / {lang}: lm-eval 0.4.13 has no task for this language; left out"
            for lang in languages
            if lang not in benchmark.tasks
        ]
    flores = write_flores_tasks(languages, task_dir, flores_dir, limit) if "flores" in groups else {}
    for key, label in ((FLORES_X_EN, "FLORES X->en chrF"), (FLORES_EN_X, "FLORES en->X chrF")):
        if key not in flores:
            continue
        benchmarks[key] = Benchmark(label, None, "chrf", flores[key])
        missing += [
            f"{label} / {lang}: no FLORES data (give --flores_dir or fill the HF datasets cache with "
            f"{FLORES_HF}); left out"
            for lang in languages
            if lang != "en" and lang not in flores[key]
        ]
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


def task_manager(include_paths: Sequence[Path]) -> TaskManager:
    """lm-eval's task index over its own tasks and ``include_paths``: about 10 s to build on 2 cores, so one serves
    every model of a run."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include_paths])


def run_model(
    model_path: Path,
    plan_: Plan,
    manager: TaskManager,
    device: str,
    batch_size: int | str,
    dtype: str,
    limit: int | None,
    max_gen_toks: int | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, list]]], list[str]]:
    """Scores of one model, benchmark -> language -> score; the scored items the same way (for the intervals); and
    one line per task that could not run. ``manager``: :func:`task_manager`'s index. ``max_gen_toks`` caps the
    translations' generated tokens (default: the task files' own)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    import moelpr  # noqa: F401  (registers the MoE-LPR model types)

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
                results = lm_eval.simple_evaluate(
                    model=model,
                    tasks=[task],
                    num_fewshot=benchmark.shots,
                    task_manager=manager,
                    limit=limit,
                    log_samples=True,
                    bootstrap_iters=0,
                    gen_kwargs=gen_kwargs,
                )
            except Exception as error:  # noqa: BLE001 - absent data surfaces as many exception types
                first_line = (str(error).strip().splitlines() or [""])[0][:200]
                failed.append(
                    f"{benchmark.label} / {lang}: {task} could not run ({type(error).__name__}: {first_line}); left out"
                )
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


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how: the languages, which of :data:`GROUPS`, where task data lies, lm-eval's settings.
    ``task_map`` (benchmark -> ``{label, shots, metric, tasks: {lang: task}}``) replaces the paper's benchmarks;
    ``limit`` scores only the first documents of each task; ``max_gen_toks`` caps the generated translations."""

    new: Sequence[str] = ("hu", "tr", "el")
    old: Sequence[str] = ("en", "es", "zh")
    groups: Sequence[str] = GROUPS
    flores_dir: Path | None = None
    helppage_tasks: Path | None = None
    task_map: Mapping[str, Mapping] | None = None
    include_paths: Sequence[Path] = ()
    limit: int | None = None
    max_gen_toks: int | None = None
    device: str = "cpu"
    batch_size: int | str = 8
    dtype: str = "float32"


@dataclass
class BenchScores:
    """Every model's scores (benchmark -> language -> score), the scored items the same way, and one line for each
    cell that could not be measured."""

    checkpoints: dict[str, Path]  # name -> directory; BASELINE names the baseline
    benchmarks: dict[str, Benchmark]
    scores: dict[str, dict]
    items: dict[str, dict]
    missing: list[str]

    @property
    def baseline(self) -> str | None:
        return BASELINE if BASELINE in self.checkpoints else None


def score_models(checkpoints: Mapping[str, Path], output_dir: Path, settings: BenchSettings) -> BenchScores:
    """Run the planned tasks on every checkpoint (name -> directory; :data:`BASELINE` names the baseline), offline.
    The task files go to ``output_dir/tasks``; a model's scores are kept in ``output_dir/scores/NAME.json`` as soon
    as it is done and taken from there while its settings stay the same, so that a stopped run resumes."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output_dir.mkdir(parents=True, exist_ok=True)
    task_dir = output_dir / "tasks"
    task_dir.mkdir(exist_ok=True)
    plan_ = plan(
        settings.new,
        settings.old,
        task_dir,
        settings.flores_dir,
        settings.helppage_tasks,
        settings.task_map,
        settings.limit,
        settings.groups,
    )
    include = [task_dir, *([settings.helppage_tasks] if settings.helppage_tasks else []), *settings.include_paths]
    scores: dict[str, dict] = {}
    items: dict[str, dict] = {}
    missing = list(plan_.missing)
    manager = None  # built when the first model has to run: a run that finds every score kept never pays for it
    for name, path in checkpoints.items():
        kept_settings = {
            "path": str(path),
            "modified": (path / "config.json").stat().st_mtime_ns,
            "tasks": {k: dict(b.tasks) for k, b in plan_.benchmarks.items()},
            "limit": settings.limit,
            "max_gen_toks": settings.max_gen_toks,
            "dtype": settings.dtype,
        }
        saved = output_dir / "scores" / f"{name}.json"
        done = json.loads(saved.read_text()) if saved.is_file() else None
        if done is not None and done["settings"] == kept_settings and "items" in done:
            logger.info("%s: scores of an earlier run with the same settings (%s)", name, saved)
            scores[name], items[name], failed = done["scores"], done["items"], done["failed"]
        else:
            manager = manager or task_manager(include)
            scores[name], items[name], failed = run_model(
                path,
                plan_,
                manager,
                settings.device,
                settings.batch_size,
                settings.dtype,
                settings.limit,
                settings.max_gen_toks,
            )
            saved.parent.mkdir(exist_ok=True)
            partial = saved.with_suffix(".partial")
            kept = {"settings": kept_settings, "scores": scores[name], "items": items[name], "failed": failed}
            partial.write_text(json.dumps(kept, ensure_ascii=False) + "\n")
            partial.replace(saved)
        missing += [f"{name}: {line}" for line in failed]
    return BenchScores(dict(checkpoints), plan_.benchmarks, scores, items, missing)
