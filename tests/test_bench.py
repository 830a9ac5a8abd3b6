"""``moelpr bench`` end to end on tiny models against local tasks in the format of the real ones, and the help-page
tasks of ``python -m moelpr_lab.corpora --lm_eval_tasks`` through lm-eval's own command line. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from test_lm_eval import run_lm_eval
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelpr.cli.bench import main as bench_main
from moelpr.evaluation.score_intervals import task_score
from moelpr_lab.corpora.tasks import completion_task_name, translation_task_name, write_helppage_tasks

# Held-out help pages, the same pages in two languages (ids as `python -m moelpr_lab.corpora` writes them).
PAGES = {
    "en": [
        "Choose Format - Cells to open the dialog where you set the number format of the selected cells.",
        "The sidebar shows the properties of the current selection and lets you change them quickly.",
        "To insert a chart, select the data range and choose Insert - Chart from the menu bar at the top.",
        "Spelling checks the current document or the selection for spelling errors and suggests corrections.",
        "Press Enter to accept the entry and move the cursor to the next cell in the same column below it.",
        "The Navigator lists the objects of the document, such as headings, tables, frames and graphics.",
        "AutoCorrect replaces common typing errors while you type, for example two capitals at a word start.",
        "Use the zoom slider in the status bar to enlarge or reduce the view of the document on the screen.",
    ],
    "hu": [
        "Válassza a Formátum - Cellák menüpontot a kijelölt cellák számformátumát beállító párbeszédablakhoz.",
        "Az oldalsáv a jelenlegi kijelölés tulajdonságait mutatja, és lehetővé teszi azok gyors módosítását.",
        "Diagram beszúrásához jelölje ki az adattartományt, majd válassza a Beszúrás - Diagram menüpontot.",
        "A helyesírás-ellenőrzés hibákat keres a dokumentumban vagy a kijelölésben, és javításokat javasol.",
        "Nyomja meg az Entert a bevitel elfogadásához, és a kurzor az alatta lévő következő cellába lép át.",
        "A Navigátor felsorolja a dokumentum objektumait, például a címsorokat, táblázatokat és képeket is.",
        "Az automatikus javítás gépelés közben kijavítja a gyakori hibákat, például a két nagybetűs kezdést.",
        "Az állapotsor nagyítási csúszkájával nagyíthatja vagy kicsinyítheti a dokumentum nézetét a képernyőn.",
    ],
}


def write_heldout(corpora: Path) -> None:
    corpora.mkdir(parents=True, exist_ok=True)
    for code, paragraphs in PAGES.items():
        lines = [{"text": f"{paragraph}\nSee also: page {index}.", "id": f"text/shared/page{index}.xhp"}
                 for index, paragraph in enumerate(paragraphs)]
        (corpora / f"{code}_heldout.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))


@pytest.fixture(scope="module")
def helppage_tasks(tmp_path_factory) -> tuple[Path, dict]:
    corpora = tmp_path_factory.mktemp("corpora")
    write_heldout(corpora)
    return corpora / "lm_eval_tasks", write_helppage_tasks(corpora, ["hu", "en"])


def test_helppage_completion_items_hold_the_true_ending_among_other_pages(helppage_tasks):
    task_dir, counts = helppage_tasks
    assert set(counts) == {completion_task_name("hu"), completion_task_name("en"), translation_task_name("hu", "en"),
                           translation_task_name("en", "hu")}
    items = [json.loads(line) for line in (task_dir / f"{completion_task_name('hu')}.jsonl").open()]
    assert len(items) == len(PAGES["hu"]) == counts[completion_task_name("hu")]["items"]
    by_page = {f"text/shared/page{i}.xhp": p for i, p in enumerate(PAGES["hu"])}
    for item in items:
        page = by_page[item["id"]]
        assert len(item["endings"]) == 4 and len(set(item["endings"])) == 4
        assert f"{item['context']} {item['endings'][item['label']]}" == page  # the page's own paragraph, cut in two
        others = [e for i, e in enumerate(item["endings"]) if i != item["label"]]
        assert all(e not in page for e in others)  # the distractors come from other pages
    assert len({item["label"] for item in items}) > 1  # the true ending's position varies
    # Translation: aligned paragraphs of the same page; the first pairs are the prompt's examples only.
    pairs = [json.loads(line) for line in (task_dir / f"{translation_task_name('en', 'hu')}.jsonl").open()]
    shots = [json.loads(line) for line in (task_dir / f"{translation_task_name('en', 'hu')}_dev.jsonl").open()]
    assert [(p["source"], p["target"]) for p in shots + pairs] == list(zip(PAGES["en"], PAGES["hu"]))
    reverse = [json.loads(line) for line in (task_dir / f"{translation_task_name('hu', 'en')}.jsonl").open()]
    assert [(p["source"], p["target"]) for p in reverse] == [(p["target"], p["source"]) for p in pairs]


def test_helppage_tasks_run_through_lm_evals_command_line(helppage_tasks, tiny_llama_dir, tmp_path):
    task_dir, counts = helppage_tasks
    tasks = [completion_task_name("hu"), translation_task_name("en", "hu")]
    # A random tiny model never ends its line: cap what it generates (the task file says 256).
    results = run_lm_eval(tiny_llama_dir, tasks, task_dir, tmp_path / "out", ("--gen_kwargs", "max_gen_toks=8"))
    completion = results[completion_task_name("hu")]
    assert 0 <= completion["acc,none"] <= 1 and 0 <= completion["acc_norm,none"] <= 1
    assert 0 <= results[translation_task_name("en", "hu")]["chrf,none"] <= 100
    (samples,) = (tmp_path / "out").glob(f"*/samples_{translation_task_name('en', 'hu')}_*.jsonl")
    first = json.loads(samples.open().readline())
    prompt = first["arguments"]["gen_args_0"]["arg_0"]
    # Three examples from the dev split, then the sentence to translate, English -> Hungarian.
    assert prompt.startswith(f"English: {PAGES['en'][0]}\nHungarian: {PAGES['hu'][0]}\n\n")
    assert prompt.count("English:") == 4 and prompt.endswith("\nHungarian:")


def _task(name: str, data: Path, **config) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data), "dev": str(data)}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice", **config,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}


def write_local_benchmarks(root: Path) -> dict:
    """ARC, HellaSwag and Belebele look-alikes (their fields and prompts) for hu and en; hu's Belebele data is
    absent. Returns the --task_map."""
    root.mkdir(parents=True, exist_ok=True)
    arc = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": "A"}
           for i, (q, c) in enumerate([("Which part of a plant takes in water?", ["roots", "flowers", "seeds"]),
                                       ("What do bees make?", ["honey", "milk", "glass"]),
                                       ("What melts ice?", ["heat", "cold", "dark"])])]
    swag = [{"ctx": c, "endings": e, "label": 0} for c, e in [
        ("She opens the cell dialog and", ["sets the number format.", "eats the sidebar.", "flies away."]),
        ("He selects the data range and", ["inserts a chart.", "sings a song.", "paints a wall."])]]
    bele = [{"flores_passage": "The sidebar shows the properties.", "question": "What does the sidebar show?",
             "mc_answer1": "properties", "mc_answer2": "cats", "mc_answer3": "rain", "mc_answer4": "bread",
             "correct_answer_num": "1"}]
    configs = []
    for lang in ("hu", "en"):
        for name, docs in (("arc", arc), ("swag", swag), ("bele", bele)):
            data = root / f"{name}_{lang}.jsonl"
            if (name, lang) != ("bele", "hu"):
                data.write_text("".join(json.dumps(d) + "\n" for d in docs))
            configs.append(_task(f"{name}_{lang}", data, **{
                "arc": {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices.text}}",
                        "doc_to_target": "{{choices.label.index(answerKey)}}"},
                "swag": {"doc_to_text": "{{ctx}}", "doc_to_choice": "endings", "doc_to_target": "label"},
                "bele": {"doc_to_text": "P: {{flores_passage}}\nQ: {{question}}\nA: {{mc_answer1}}\nB: {{mc_answer2}}"
                                        "\nC: {{mc_answer3}}\nD: {{mc_answer4}}\nAnswer:",
                         "doc_to_choice": ["A", "B", "C", "D"],
                         "doc_to_target": "{{['1', '2', '3', '4'].index(correct_answer_num)}}"},
            }[name]))
    for config in configs:
        (root / f"{config['task']}.yaml").write_text(yaml.safe_dump(config))
    return {
        "arc": {"label": "ARC-Challenge", "shots": 2, "metric": "acc_norm", "tasks": {"hu": "arc_hu", "en": "arc_en"}},
        "hellaswag": {"label": "HellaSwag", "shots": 1, "metric": "acc_norm",
                      "tasks": {"hu": "swag_hu", "en": "swag_en"}},
        "belebele": {"label": "Belebele", "shots": 0, "metric": "acc", "tasks": {"hu": "bele_hu", "en": "bele_en"}},
    }


def write_flores(root: Path) -> Path:
    """A FLORES-200 directory (dev/ and devtest/, one sentence per line, aligned across languages)."""
    for split in ("dev", "devtest"):
        (root / split).mkdir(parents=True)
        (root / split / f"eng_Latn.{split}").write_text("\n".join(PAGES["en"][:4] if split == "dev" else PAGES["en"][4:]))
        (root / split / f"hun_Latn.{split}").write_text("\n".join(PAGES["hu"][:4] if split == "dev" else PAGES["hu"][4:]))
    return root


def test_bench_writes_the_papers_layout(tiny_llama_dir, helppage_tasks, tmp_path, capsys):
    # The model: the tiny base with perturbed weights, so that its scores differ from the baseline's.
    changed = tmp_path / "changed"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator) * parameter.std())
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(changed)

    tasks = tmp_path / "tasks"
    task_map = tmp_path / "task_map.json"
    task_map.write_text(json.dumps(write_local_benchmarks(tasks)))
    out = tmp_path / "bench"
    argv = ["--model_path", str(changed), "--baseline", str(tiny_llama_dir), "--new", "hu", "--old", "en",
            "--task_map", str(task_map), "--include_path", str(tasks), "--flores_dir", str(write_flores(tmp_path / "flores")),
            "--helppage_tasks", str(helppage_tasks[0]), "--output_dir", str(out), "--limit", "3", "--max_gen_toks", "8"]
    assert bench_main(argv) == 0
    err = capsys.readouterr().err
    absent = [line for line in err.splitlines() if "bele_hu" in line]
    assert len(absent) == 2 and all(line.startswith("moelpr bench: ") and "left out" in line for line in absent)

    report = json.loads((out / "bench.json").read_text())
    assert report["checkpoints"] == {"model": str(changed), "baseline": str(tiny_llama_dir)}
    assert list(report["models"]) == list(report["scores"]) == ["baseline", "model"]
    assert set(report["benchmarks"]) == {"arc", "hellaswag", "belebele", "flores_x_en", "flores_en_x",
                                         "help_completion", "help_x_en", "help_en_x"}
    assert report["benchmarks"]["belebele"]["languages"] == ["en"]  # hu's data absent: out of every average
    assert report["benchmarks"]["flores_en_x"]["languages"] == ["hu"]
    # Hand computation of the layout from the per-language scores lm-eval gave.
    for name in ("model", "baseline"):
        scores = report["scores"][name]
        assert "hu" not in scores["belebele"]
        per_benchmark = {"expanded": [], "original": []}
        for key, entry in report["benchmarks"].items():
            new = [scores[key][lang] for lang in entry["languages"] if lang == "hu"]
            old = [scores[key][lang] for lang in entry["languages"] if lang == "en"]
            got = report["models"][name]["benchmarks"][key]
            assert got["expanded"] == (pytest.approx(sum(new) / len(new)) if new else None)
            assert got["original"] == (pytest.approx(sum(old) / len(old)) if old else None)
            per_benchmark["expanded"] += [sum(new) / len(new)] if new else []
            per_benchmark["original"] += [sum(old) / len(old)] if old else []
        for group, values in per_benchmark.items():
            assert len(values) == {"expanded": 7, "original": 4}[group]
            assert report["models"][name][group] == pytest.approx(sum(values) / len(values))
    for group in ("expanded", "original"):
        model_avg, base_avg = report["models"]["model"][group], report["models"]["baseline"][group]
        versus = report["models"]["model"]["vs_baseline"][group]
        assert versus["change"] == pytest.approx(model_avg - base_avg)
        assert versus["kept"] == pytest.approx(model_avg / base_avg)
    assert report["models"]["model"]["expanded"] != report["models"]["baseline"]["expanded"]
    # The kept items give lm-eval's scores back, and the changes' paired intervals hold the changes.
    for name in ("model", "baseline"):
        kept = json.loads((out / "scores" / f"{name}.json").read_text())
        for key, by_lang in kept["items"].items():
            for lang, task in by_lang.items():
                assert len(task["ids"]) == len(task["values"]) <= 3
                metric = report["benchmarks"][key]["metric"] if key in report["benchmarks"] else "acc"
                assert task_score(metric, task["values"]) == pytest.approx(report["scores"][name][key][lang])
    for group in ("expanded", "original"):
        versus = report["models"]["model"]["vs_baseline"][group]
        low, high = versus["interval"]
        assert low <= versus["change"] <= high
        for key, entry in report["models"]["model"]["benchmarks"].items():
            if entry[group] is not None:
                cell = entry["vs_baseline"][group]
                assert cell["interval"][0] <= cell["change"] <= cell["interval"][1]
    # Accuracies in percent: a 3-question task scores a multiple of 100/3.
    assert report["scores"]["model"]["arc"]["en"] * 3 / 100 == pytest.approx(round(report["scores"]["model"]["arc"]["en"] * 3 / 100))

    table = (out / "bench.md").read_text()
    assert "| baseline |" in table and "| model |" in table and "limited to its first 3 documents" in table
    assert f"{100 * report['models']['model']['vs_baseline']['original']['kept']:.1f}%" in table
    assert "bele_hu" in table  # the absent task is named in the report too
    assert matplotlib.image.imread(out / "bench.png").shape[0] > 300


def test_bench_of_several_named_models_reuses_finished_models_scores(tiny_llama_dir, helppage_tasks, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--baseline", str(tiny_llama_dir), "--model_path", f"first={tiny_llama_dir}", "--model_path",
            f"second={tiny_llama_dir}", "--new", "hu", "--old", "en", "--benchmarks", "helppages",
            "--helppage_tasks", str(helppage_tasks[0]), "--output_dir", str(out), "--limit", "2", "--max_gen_toks", "4"]
    assert bench_main(argv) == 0
    assert "FLORES" not in capsys.readouterr().err  # not asked for, so not reported missing either
    report = json.loads((out / "bench.json").read_text())
    assert list(report["models"]) == ["baseline", "first", "second"]
    assert set(report["benchmarks"]) == {"help_completion", "help_x_en", "help_en_x"}
    assert report["scores"]["first"] == report["scores"]["baseline"]  # the same checkpoint, scored the same

    # A second run takes a finished model's kept scores (marked here) while its settings are the same...
    kept = out / "scores" / "first.json"
    marked = json.loads(kept.read_text())
    marked["scores"]["help_completion"]["hu"] = -1.0
    kept.write_text(json.dumps(marked))
    assert bench_main(argv) == 0
    assert json.loads((out / "bench.json").read_text())["scores"]["first"]["help_completion"]["hu"] == -1.0
    # ... and scores it again when they differ (here the checkpoint's path).
    alias = tmp_path / "alias"
    alias.symlink_to(tiny_llama_dir)
    assert bench_main([arg.replace(f"first={tiny_llama_dir}", f"first={alias}") for arg in argv]) == 0
    assert json.loads((out / "bench.json").read_text())["scores"]["first"]["help_completion"]["hu"] >= 0
    # Kept items of other documents than the baseline's (a task file changed under a kept score) are refused.
    marked = json.loads(kept.read_text())
    marked["items"]["help_completion"]["hu"]["ids"][0] = "another document"
    kept.write_text(json.dumps(marked))
    assert bench_main([arg.replace(f"first={tiny_llama_dir}", f"first={alias}") for arg in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("moelpr bench: error: first and baseline were scored on different items of help_completion / "
                       "hu (2 vs 2, 2 not in both): score them with the same task files and --limit")


def test_bench_rejects_mistakes_in_one_line(tiny_llama_dir, tmp_path, capsys):
    cases = [
        (["--model_path", f"a={tiny_llama_dir}", "--model_path", f"a={tiny_llama_dir}"], "the name a is given twice"),
        (["--model_path", str(tiny_llama_dir), "--benchmarks", "paper,mmlu"], "--benchmarks: choose from"),
        (["--model_path", f"a/b={tiny_llama_dir}"], "must be letters, digits"),
        (["--model_path", str(tiny_llama_dir), "--benchmarks", "helppages"], "needs --helppage_tasks"),
        (["--model_path", str(tmp_path / "none")], "is not a model directory"),
        (["--model_path", str(tiny_llama_dir), "--new", "hu,en"], "en is given as both new and old"),
        (["--model_path", str(tiny_llama_dir), "--flores_dir", str(tmp_path / "nope")], "directory not found"),
    ]
    for args, message in cases:
        assert bench_main([*args, "--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_corpora_refuses_helppage_tasks_without_english_before_building(tmp_path, capsys):
    from moelpr_lab.corpora.cli import main as corpora_main

    assert corpora_main(["--output_dir", str(tmp_path / "c"), "--old", "es", "--lm_eval_tasks"]) == 2
    err = capsys.readouterr().err.strip()
    assert "add en to --old" in err and len(err.splitlines()) == 1 and not (tmp_path / "c").exists()
