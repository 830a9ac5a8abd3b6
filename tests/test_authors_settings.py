"""The MoE-LPR authors' settings on request: their LPR form (cross-entropy of the router's softmax outputs), their
router initialisation (xavier_normal_), and the unseen original languages that no recipe or script may train on."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from llamafactory.hparams import get_train_args
from safetensors.torch import load_file
from test_corpora import GREEK, HUNGARIAN, help_corpus_tree, read_jsonl
from transformers import AutoModelForCausalLM

import moelpr.llamafactory_plugin as plugin
from moelpr.cli.upcycle import main as upcycle_main
from moelpr.models.moe import lpr_loss
from moelpr.upcycling.settings import UpcycleSettings
from moelpr.upcycling.upcycle import router_rows, upcycle
from moelpr_lab.corpora import (
    UNSEEN,
    CorpusOptions,
    build_corpora,
    dataset_entries,
    general_english_corpus,
    help_corpus,
    is_heldout,
)
from moelpr_lab.corpora.cli import main as corpora_main

plugin.apply()

REPO = Path(__file__).resolve().parent.parent
UNSEEN_LANGUAGES = ("de", "fr", "es")


def authors_lpr_loss(layer_logits: list[torch.Tensor], langs: torch.Tensor) -> torch.Tensor:
    """The authors' ``lpr_loss_func`` (their modified modeling_qwen2.py), rewritten from its definition: router
    logits of all layers stacked, a softmax, the old-language (layer, token) rows selected by the language mask (0 on
    padding, as their collator fills it), and ``CrossEntropyLoss`` of those probabilities toward class 0."""
    stacked = torch.softmax(torch.stack(layer_logits).float(), dim=-1)  # [layers, tokens, experts]
    mask = langs.reshape(-1).bool().expand(stacked.shape[:2])
    probs = stacked[mask]
    return torch.nn.CrossEntropyLoss()(probs, torch.zeros(probs.shape[0], dtype=torch.long))


@pytest.fixture()
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 300, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding of the second sequence
    lang_mask = torch.zeros_like(input_ids)
    lang_mask[0, :] = 1  # first sequence old-language, second new
    lang_mask[1, :4] = 1  # ... but for its first tokens
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "lang_mask": lang_mask, "labels": labels}


def test_authors_form_matches_their_formula_in_value_and_gradient(upcycled_llama_dir, batch):
    model = AutoModelForCausalLM.from_pretrained(upcycled_llama_dir, torch_dtype=torch.float32)
    model.config.lpr_loss_form = "authors"
    model.config.router_aux_loss_coef = 0.0
    # Their collator zeroes the language mask on padding; the model masks padding itself.
    langs = batch["lang_mask"] * batch["attention_mask"]
    routers = [layer.mlp.router.weight for layer in model.model.layers]

    model.train()
    model.config.lpr_loss_coef = 0.0
    out = model(**batch, output_router_logits=True)
    expected = authors_lpr_loss(list(out.router_logits), langs)
    torch.testing.assert_close(out.lpr_loss, expected, rtol=1e-5, atol=1e-6)
    lm_only = torch.autograd.grad(out.loss, routers, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, routers)

    model.config.lpr_loss_coef = 0.1
    out = model(**batch)
    with_lpr = torch.autograd.grad(out.loss, routers)
    for full, lm, lpr in zip(with_lpr, lm_only, expected_grads):
        torch.testing.assert_close(full - lm, 0.1 * lpr, rtol=1e-4, atol=1e-7)
    assert max(g.abs().max().item() for g in expected_grads) > 0

    # The paper's form (the default) is a different loss on the same logits.
    model.config.lpr_loss_form = "paper"
    paper = model(**batch).lpr_loss
    assert paper.item() > expected.item() + 1e-4


def test_authors_form_is_the_second_softmax_and_weaker():
    logits = torch.randn(64, 4) * 2
    old = torch.rand(64) < 0.5
    authors = lpr_loss(logits, old, "authors")
    # Bounded below by log(1 + (N - 1) / e) (probabilities in [0, 1]); the paper's form can go to 0.
    assert authors.item() >= math.log(1 + 3 / math.e)
    assert lpr_loss(logits * 0 + torch.tensor([20.0, 0, 0, 0]), old, "paper").item() < 1e-6
    with pytest.raises(ValueError, match="'paper' or 'authors'"):
        lpr_loss(logits, old, "both")


@pytest.fixture()
def review_args(upcycled_llama_dir, tmp_path) -> dict:
    return {
        "model_name_or_path": str(upcycled_llama_dir), "stage": "pt", "do_train": True, "finetuning_type": "moelpr",
        "moelpr_stage": "review", "generate_lang_mask": True, "dataset": "new_hu,old_en",
        "dataset_dir": str(REPO / "data"), "cutoff_len": 32, "output_dir": str(tmp_path / "out"), "use_cpu": True,
        "report_to": "none",
    }


def test_yaml_key_resolves_and_refuses_bad_values(review_args):
    *_, finetuning_args, _ = get_train_args(review_args)
    assert finetuning_args.lpr_loss_form == "paper"
    *_, finetuning_args, _ = get_train_args({**review_args, "lpr_loss_form": "authors"})
    assert finetuning_args.lpr_loss_form == "authors"
    with pytest.raises(ValueError, match="`lpr_loss_form` must be one of paper, authors, got 'logits'"):
        get_train_args({**review_args, "lpr_loss_form": "logits"})
    with pytest.raises(ValueError, match="only apply with `finetuning_type: moelpr`"):
        get_train_args({**review_args, "finetuning_type": "full", "moelpr_stage": None, "lpr_loss_form": "authors"})


def test_xavier_router_rows_have_the_authors_std():
    hidden, experts = 4096, 4
    rows = torch.cat([router_rows(0, layer, hidden, torch.float32)(experts) for layer in range(4)])
    expected = math.sqrt(2 / (hidden + experts))  # 0.0221 at 4096
    # The sample std of n normal draws has a relative standard error of 1 / sqrt(2 (n - 1)); allow 4 of them.
    assert abs(rows.std().item() / expected - 1) < 4 / math.sqrt(2 * (rows.numel() - 1))
    assert abs(rows.mean().item()) < 4 * expected / math.sqrt(rows.numel())
    normal = router_rows(0, 0, hidden, torch.float32, "normal", 0.02)(experts)
    assert abs(normal.std().item() / 0.02 - 1) < 4 / math.sqrt(2 * (normal.numel() - 1))


def test_router_rows_are_seeded_per_layer():
    draw = lambda seed, layer: router_rows(seed, layer, 64, torch.float32)(4)  # noqa: E731
    assert torch.equal(draw(3, 1), draw(3, 1))
    assert not torch.equal(draw(3, 1), draw(3, 2))
    assert not torch.equal(draw(3, 1), draw(4, 1))
    # xavier and normal draw the same normal numbers, scaled: the seed fixes the direction of every router.
    xavier, normal = router_rows(3, 1, 64, torch.float32)(4), router_rows(3, 1, 64, torch.float32, "normal", 0.02)(4)
    torch.testing.assert_close(xavier / math.sqrt(2 / 68), normal / 0.02)


def _routers(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in model_dir.glob("*.safetensors"):
        tensors.update({k: v for k, v in load_file(shard).items() if k.endswith("router.weight")})
    return tensors


def test_upcycle_initialises_routers_as_the_authors_by_default(tiny_llama_dir, tmp_path):
    default = _routers(upcycle(tiny_llama_dir, tmp_path / "xavier", UpcycleSettings(num_experts=4, seed=7)))
    again = _routers(upcycle(tiny_llama_dir, tmp_path / "again", UpcycleSettings(num_experts=4, seed=7)))
    normal_init = UpcycleSettings(num_experts=4, seed=7, router_init="normal")
    normal = _routers(upcycle(tiny_llama_dir, tmp_path / "normal", normal_init))
    hidden = next(iter(default.values())).shape[1]
    values = torch.cat([w.float().reshape(-1) for w in default.values()])
    expected = math.sqrt(2 / (hidden + 4))
    assert abs(values.std().item() / expected - 1) < 4 / math.sqrt(2 * (values.numel() - 1))
    assert default.keys() == again.keys() == normal.keys() and len(default) > 1
    assert all(torch.equal(default[name], again[name]) for name in default)
    config = json.loads((tmp_path / "normal" / "config.json").read_text())
    for name in default:
        torch.testing.assert_close(default[name] / expected, normal[name] / config["initializer_range"])


def test_bad_router_init_is_a_one_line_error(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        upcycle_main(["--model_path", str(tiny_llama_dir), "--output_path", str(tmp_path / "x"), "--router_init", "he"])
    assert exit_info.value.code == 2
    assert "--router_init: invalid choice: 'he'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- Unseen original languages: built, held out, never trained on ---

GERMAN = [
    "Um das Dokument zu speichern, wählen Sie im Menü Datei den Befehl Speichern und geben Sie einen Namen ein.",
    "In diesem Dialog können Sie festlegen, in welchem Format die Zahlen in den Zellen der Tabelle erscheinen.",
]


@pytest.fixture()
def unseen_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    page_ids = [f"text/shared/guide/page{i:02d}.html" for i in range(40)]
    help_corpus_tree(cache, "hu", "libreoffice-help-hu", {p: [f"Oldal {i}", HUNGARIAN[i % 3]] for i, p in enumerate(page_ids)})
    help_corpus_tree(cache, "el", "libreoffice-help-el", {p: [f"Σελίδα {i}", GREEK] for i, p in enumerate(page_ids)})
    help_corpus_tree(cache, "de", "libreoffice-help-de", {p: [f"Seite {i}", GERMAN[i % 2]] for i, p in enumerate(page_ids)})
    return cache


def test_unseen_language_gets_held_out_pages_only_and_no_dataset_entry(unseen_cache, tmp_path):
    out = tmp_path / "corpora"
    specs = [help_corpus("hu", "new"), help_corpus("el", "new"), help_corpus("de", UNSEEN)]
    manifest = build_corpora(specs, out, unseen_cache, CorpusOptions(heldout_fraction=0.25), workers=1)
    held = read_jsonl(out / "de_heldout.jsonl")
    assert held and not (out / "de_train.jsonl").exists()
    assert all(is_heldout(r["id"], 0.25) for r in held)
    # The same pages as the other languages' held-out pages, whose translations nobody trains on either.
    assert {r["id"] for r in held} == {r["id"] for r in read_jsonl(out / "hu_heldout.jsonl")}
    assert all(sentence in "\n".join(r["text"] for r in held) for sentence in GERMAN)
    info = json.loads((out / "dataset_info.json").read_text())
    assert not [name for name in info if name.startswith("de_")] and "hu_train" in info
    assert manifest["de"]["stats"]["train_documents"] == 0
    # A language built as old before and unseen now loses its train file and its dataset entries.
    shutil.rmtree(out)
    build_corpora([help_corpus("de", "old")], out, unseen_cache, CorpusOptions(heldout_fraction=0.25), workers=1)
    assert "de_train" in json.loads((out / "dataset_info.json").read_text())
    build_corpora([help_corpus("de", UNSEEN)], out, unseen_cache, CorpusOptions(heldout_fraction=0.25), workers=1)
    assert not (out / "de_train.jsonl").exists()
    assert not [name for name in json.loads((out / "dataset_info.json").read_text()) if name.startswith("de_")]


def test_cli_refuses_an_unseen_language_that_is_also_trained_on(capsys):
    with pytest.raises(SystemExit):
        corpora_main(["--new", "hu", "--old", "en,de", "--unseen", "de,fr"])
    assert "cannot also be --new or --old: ['de']" in capsys.readouterr().err


def _script_dataset_names(text: str) -> set[str]:
    """Every LLaMA-Factory dataset name a script passes: the ``*_train`` / ``*_heldout`` words it contains."""
    return set(re.findall(r"\b([a-z]+(?:_[a-z]+)*_(?:train|heldout))\b", text))


def test_no_recipe_or_script_names_an_unseen_language():
    """Every dataset the recipes and the comparison scripts name resolves to a dataset_info.json entry (the repo's
    data/ or the entries `python -m moelpr_lab.corpora` writes for the scripts' languages, unseen ones included) whose
    file is not an unseen language's."""
    corpus_specs = [help_corpus(c, "new") for c in ("hu", "tr", "el")] + [help_corpus("en", "old")]
    corpus_specs += [general_english_corpus()] + [help_corpus(c, UNSEEN) for c in UNSEEN_LANGUAGES]
    built = dataset_entries(corpus_specs)
    repo_data = json.loads((REPO / "data" / "dataset_info.json").read_text())
    unseen_files = {f"{lang}_{split}.jsonl" for lang in UNSEEN_LANGUAGES for split in ("train", "heldout")}

    named: list[tuple[str, str, dict]] = []
    recipes = sorted((REPO / "examples").rglob("*.yaml"))
    assert len(recipes) >= 8
    for recipe in recipes:
        settings = yaml.safe_load(recipe.read_text()) or {}
        datasets = [d.strip() for d in str(settings.get("dataset", "")).split(",") if d.strip()]
        info = repo_data if settings.get("dataset_dir") == "data" else built
        named += [(recipe.name, d, info) for d in datasets]
    for script in ("demo.sh", "compare.sh", "paper_budget.sh", "lr_sweep.sh", "stage1.sh", "stage2.sh"):
        text = (REPO / "scripts" / script).read_text()
        named += [(script, d, built) for d in _script_dataset_names(text)]
    assert any(source == "paper_budget.sh" for source, _, _ in named)

    for source, name, info in named:
        assert name in info, f"{source} names {name!r}, which no dataset_info.json defines"
        assert info[name]["file_name"] not in unseen_files, f"{source} trains on {name!r}"
        assert not any(name.startswith(f"{lang}_") for lang in UNSEEN_LANGUAGES), f"{source} names {name!r}"
    # The scripts evaluate the unseen languages from their held-out files directly.
    assert "--unseen" in (REPO / "scripts" / "demo.sh").read_text()


needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not installed (not Debian)")
needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")


@needs_apt
@needs_dpkg
def test_real_unseen_language_packages(tmp_path):
    """Downloads libreoffice-help-de, -fr and -es and builds their held-out pages from 150 pages each."""
    out = tmp_path / "corpora"
    specs = [help_corpus(code, UNSEEN) for code in UNSEEN_LANGUAGES]
    manifest = build_corpora(specs, out, tmp_path / "cache", CorpusOptions(max_documents=150), workers=2)
    from moelpr_lab.corpora.langfilter import identify

    for lang in UNSEEN_LANGUAGES:
        held = read_jsonl(out / f"{lang}_heldout.jsonl")
        assert held and not (out / f"{lang}_train.jsonl").exists()
        assert manifest[lang]["stats"]["pages"] == 150
        assert identify([r["text"] for r in held]) == [lang] * len(held)
    assert not json.loads((out / "dataset_info.json").read_text())
