"""lm-eval task files of ours: local jsonl documents and the YAML that lm-eval 0.4.13 reads from ``--include_path``.

Two forms, both over data written beside the YAML (``dataset_path: json``), so nothing is downloaded at run time:
completion multiple choice in HellaSwag's form (a context, four endings, the index of the true one; accuracy and
length-normalised accuracy) and translation (few-shot prompted, greedy, scored with chrF by sacrebleu).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

# Language codes as the demo names them -> (English name for prompts, FLORES-200 / Belebele code).
LANGUAGES = {
    "en": ("English", "eng_Latn"),
    "es": ("Spanish", "spa_Latn"),
    "zh": ("Chinese", "zho_Hans"),
    "hu": ("Hungarian", "hun_Latn"),
    "tr": ("Turkish", "tur_Latn"),
    "el": ("Greek", "ell_Grek"),
    "de": ("German", "deu_Latn"),
    "fr": ("French", "fra_Latn"),
    "it": ("Italian", "ita_Latn"),
    "pt": ("Portuguese", "por_Latn"),
    "ru": ("Russian", "rus_Cyrl"),
    "ja": ("Japanese", "jpn_Jpan"),
    "ko": ("Korean", "kor_Hang"),
    "ar": ("Arabic", "arb_Arab"),
    "fi": ("Finnish", "fin_Latn"),
    "pl": ("Polish", "pol_Latn"),
    "cs": ("Czech", "ces_Latn"),
    "nl": ("Dutch", "nld_Latn"),
    "sv": ("Swedish", "swe_Latn"),
    "uk": ("Ukrainian", "ukr_Cyrl"),
    "vi": ("Vietnamese", "vie_Latn"),
}
TRANSLATION_SHOTS = 3
MAX_GENERATED_TOKENS = 256


def language_name(code: str) -> str:
    return LANGUAGES.get(code, (code, None))[0]


def _metric(name: str, aggregation: str) -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": True}


def write_jsonl(path: Path, records: Sequence[Mapping]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def _write_task(directory: Path, config: dict) -> str:
    (directory / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    return config["task"]


def write_completion_task(directory: Path, task: str, docs: Sequence[Mapping]) -> str:
    """A HellaSwag-form task: each doc ``{"context", "endings": [4 strings], "label": int, "id"}``; the model scores
    each ending after the context; ``acc`` and ``acc_norm`` (per byte of the ending), as lm-eval's hellaswag."""
    data = write_jsonl(directory / f"{task}.jsonl", docs)
    return _write_task(directory, {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "endings",
        "doc_to_target": "label",
        "metric_list": [_metric("acc", "mean"), _metric("acc_norm", "mean")],
        "metadata": {"version": 1.0},
    })


def write_translation_task(
    directory: Path, task: str, source: str, target: str, test: Sequence[Mapping], shots: Sequence[Mapping]
) -> str:
    """A translation task ``source`` -> ``target`` (language codes): docs ``{"source", "target"}``; the prompt is
    ``shots`` (the first ones of the ``dev`` split, always the same) then ``<Source>: ... \\n<Target>:``; greedy
    generation to the end of the line, scored with corpus chrF (0-100)."""
    test_file = write_jsonl(directory / f"{task}.jsonl", test)
    dev_file = write_jsonl(directory / f"{task}_dev.jsonl", shots)
    return _write_task(directory, {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(test_file.resolve()), "dev": str(dev_file.resolve())}},
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": len(shots),
        "output_type": "generate_until",
        "doc_to_text": f"{language_name(source)}: {{{{source}}}}\n{language_name(target)}:",
        "doc_to_target": "{{target}}",
        "fewshot_delimiter": "\n\n",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": MAX_GENERATED_TOKENS},
        "filter_list": [{"name": "none", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
        "metric_list": [_metric("chrf", "chrf")],
        "metadata": {"version": 1.0},
    })
