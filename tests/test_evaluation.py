"""``moelpr eval``: block packing, token-weighted perplexity, the routing report and the written files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moelpr  # noqa: F401  (registers the MoE-LPR model types)
from moelpr.cli.eval import main as eval_main
from moelpr.evaluation import evaluate_language, token_blocks
from moelpr_lab.eval_report_check import check_report

TEXTS = {
    "en": ["The quick brown fox jumps over the lazy dog.", "A Mixture-of-Experts model routes every token."] * 6,
    "hu": ["Magyarul: a gyors barna róka átugorja a lusta kutyát."] * 10,
}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def heldout_files(tmp_path):
    return {lang: write_jsonl(tmp_path / f"{lang}.jsonl", texts) for lang, texts in TEXTS.items()}


def test_token_blocks_pack_texts_with_eos_like_llamafactory(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = TEXTS["en"][:3]
    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = token_blocks(tokenizer, texts, cutoff_len=16)
    assert [t for block in blocks for t in block] == stream
    assert all(len(block) == 16 for block in blocks[:-1]) and 2 <= len(blocks[-1]) <= 16
    capped = token_blocks(tokenizer, texts, cutoff_len=16, max_tokens=20)
    # Each text gives at most one block's worth under --max_tokens (a cut one still ends with eos).
    first, second = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts[:2])
    assert len(first) > 16 and [len(b) for b in capped] == [16, 4]
    assert capped[0] == first[:15] + [tokenizer.eos_token_id] and capped[1] == second[:4]


def test_max_tokens_is_spread_over_documents_so_one_long_page_cannot_fill_it(tiny_llama_dir):
    """The Greek held-out set once opened with a 20k-character glossary that filled the whole budget alone: one
    document, so its bootstrap interval had nothing to resample."""
    from moelpr.evaluation.perplexity import SPREAD_DOCUMENTS, document_cap, packed_blocks

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    eos = tokenizer.eos_token_id
    long_page = " ".join(["glossary entry"] * 400)
    texts = [long_page] + TEXTS["en"] * 4
    lengths = [len(tokenizer(t + tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for t in texts]
    max_tokens = 800
    cap = max(8, math.ceil(max_tokens / SPREAD_DOCUMENTS))
    assert lengths[0] > max_tokens > cap > max(lengths[1:])
    blocks, owners = packed_blocks(tokenizer, texts, cutoff_len=8, max_tokens=max_tokens)
    flat = [t for owner in owners for t in owner]
    assert sum(map(len, blocks)) == max_tokens and flat.count(0) == cap
    expected_documents, total = 1, cap  # the short texts follow whole until the budget is met
    for length in lengths[1:]:
        if total >= max_tokens:
            break
        total, expected_documents = total + length, expected_documents + 1
    assert len(set(flat)) == expected_documents > SPREAD_DOCUMENTS
    stream = [t for block in blocks for t in block]
    first = tokenizer(long_page, add_special_tokens=False)["input_ids"]
    assert stream[: cap - 1] == first[: cap - 1] and stream[cap - 1] == eos  # a cut page still ends with eos
    # Too few documents for the floor: the cap rises until they fill the budget, the short ones kept whole.
    assert document_cap([5, 7, 1000, 1000], 1000, 8) == 494 and 5 + 7 + 2 * 494 >= 1000 > 5 + 7 + 2 * 493
    assert document_cap([5, 7], 1000, 8) >= 7  # fewer tokens than the budget: everything is kept
    unlimited, _ = packed_blocks(tokenizer, texts[:3], cutoff_len=8)
    assert sum(map(len, unlimited)) == sum(lengths[:3])


def test_perplexity_is_token_weighted_over_blocks(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    blocks = token_blocks(tokenizer, TEXTS["en"], cutoff_len=25)
    assert len(blocks) >= 3 and len(blocks[-1]) < 25  # a short last block: batches of unequal length
    result = evaluate_language(model, blocks, batch_size=2, is_moe=False)
    # Reference: the model's own mean loss per block, weighted by each block's predicted tokens.
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item() for b in blocks]
    weights = [len(b) - 1 for b in blocks]
    assert result.predicted_tokens == sum(weights)
    assert result.nll_sum == pytest.approx(sum(loss * w for loss, w in zip(losses, weights)), rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(result.nll_sum / sum(weights)))
    assert result.routing is None


def test_routing_totals_of_an_moe_model(upcycled_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(upcycled_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(upcycled_llama_dir)
    blocks = token_blocks(tokenizer, TEXTS["en"], cutoff_len=16)
    routing = evaluate_language(model, blocks, batch_size=4, is_moe=True).routing
    assert routing.tokens == sum(len(b) for b in blocks)
    share, probs = routing.expert0_top1_share(), routing.mean_router_prob()
    assert len(share) == len(probs) == model.config.num_hidden_layers
    assert all(0.0 <= s <= 1.0 for s in share)
    assert all(len(p) == 4 and sum(p) == pytest.approx(1.0) for p in probs)

    # A router that strongly prefers expert 0 must show up as a share of 1 and a probability near 1.
    with torch.no_grad():
        for block in model.moe_blocks():
            block.router.weight.zero_()
    for layer in model.model.layers:
        layer.mlp.router.register_forward_hook(lambda module, args, out: out + torch.tensor([50.0, 0.0, 0.0, 0.0]))
    routing = evaluate_language(model, blocks, batch_size=4, is_moe=True).routing
    assert routing.expert0_top1_share() == [1.0] * model.config.num_hidden_layers
    assert all(p[0] > 0.99 for p in routing.mean_router_prob())


def test_eval_command_writes_the_report(tiny_llama_dir, upcycled_llama_dir, heldout_files, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    history = [{"step": s, "loss": 5.0 - s / 10, "learning_rate": 1e-4} for s in (1, 2, 3)] + [{"step": 3, "train_runtime": 1.0}]
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    out = tmp_path / "report"
    argv = ["--model", f"dense={tiny_llama_dir}", "--model", f"moe={upcycled_llama_dir}", "--output_dir", str(out),
            "--cutoff_len", "16", "--max_tokens", "40", "--old_languages", "en", "--run_dir", f"stage1={run_dir}"]
    for lang, path in heldout_files.items():
        argv += ["--heldout", f"{lang}={path}"]
    assert eval_main(argv) == 0

    report = json.loads((out / "perplexity.json").read_text())
    assert list(report["models"]) == ["dense", "moe"] and report["languages"] == {"en": "old", "hu": "new"}
    assert report["models"]["dense"]["kind"] == "dense" and report["models"]["moe"]["kind"] == "moe"
    assert report["settings"]["max_tokens_spread_over_documents"] == 20  # what demo.sh tells old reports by
    for model in report["models"].values():
        for lang in ("en", "hu"):
            entry = model["languages"][lang]
            assert entry["predicted_tokens"] == 40 - 3  # 40 tokens in blocks of 16, 16, 8
            assert entry["perplexity"] == pytest.approx(math.exp(entry["nll_sum"] / entry["predicted_tokens"]))
    # Upcycling preserves the dense model's function, so both give the same perplexity.
    assert report["models"]["moe"]["languages"]["hu"]["perplexity"] == pytest.approx(
        report["models"]["dense"]["languages"]["hu"]["perplexity"], rel=1e-3
    )
    table = (out / "perplexity.md").read_text()
    assert "| en (old) | hu (new) |" in table and "| dense |" in table and "Change relative to `dense`" in table
    # Same tokenizer, same text: the change is resampled paired, and an upcycled model's change is nil.
    change = report["models"]["moe"]["languages"]["hu"]["change_vs_baseline"]
    assert change["paired"] and abs(change["interval"][0]) < 1e-3 and abs(change["interval"][1]) < 1e-3
    low, high = report["models"]["dense"]["languages"]["en"]["interval"]
    assert low < report["models"]["dense"]["languages"]["en"]["perplexity"] < high
    # The 40 tokens cover the first few texts; the bootstrap resamples those texts, each token counted in its own.
    entry = report["models"]["dense"]["languages"]["en"]
    assert entry["document_ids"] == [f"en.jsonl#{line}" for line in range(1, len(entry["document_nll"]) + 1)]
    assert sum(entry["document_tokens"]) == entry["predicted_tokens"] and len(entry["document_nll"]) >= 2

    routing = json.loads((out / "routing.json").read_text())
    assert list(routing) == ["moe"]  # dense models have no routing
    assert routing["moe"]["layers"] == [0, 1, 2, 3] and routing["moe"]["num_experts"] == 4
    assert len(routing["moe"]["languages"]["hu"]["expert0_top1_share"]) == 4
    for name in ("routing_heatmap.png", "loss_curves.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 300
    assert json.loads((out / "loss_curves.json").read_text()) == {"stage1": [[1, 4.9], [2, 4.8], [3, 4.7]]}

    # The CI check accepts this report, and notices what is missing or inconsistent.
    assert check_report(out, models=["dense", "moe"], languages=["en", "hu"], runs=True) == []
    assert check_report(out, models=["full_ft"]) == ["model full_ft missing"]
    report["models"]["moe"]["languages"]["hu"]["perplexity"] *= 2
    (out / "perplexity.json").write_text(json.dumps(report))
    (out / "routing_heatmap.png").unlink()
    assert check_report(out) == ["moe/hu: perplexity does not match nll_sum / predicted_tokens", "routing_heatmap.png is missing"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "nameonly"], "--model expects NAME=PATH, got 'nameonly'"),
        (["--model", "a=/no/such/dir"], "--model a: /no/such/dir is not a model directory"),
        (["--heldout", "hu=/no/such.jsonl"], "--heldout hu: file not found: /no/such.jsonl"),
        (["--old_languages", "de"], "--old_languages names de, which no --heldout gives"),
        (["--heldout", "en=x"], "--heldout: LANG 'en' is given twice"),
    ],
)
def test_eval_command_rejects_mistakes_in_one_line(args, message, tiny_llama_dir, heldout_files, tmp_path, capsys):
    base = {"--model": f"m={tiny_llama_dir}", "--heldout": f"en={heldout_files['en']}"}
    argv = ["--output_dir", str(tmp_path / "out"), "--heldout", base["--heldout"]]
    if "--model" not in args:
        argv += ["--model", base["--model"]]
    assert eval_main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_report_of_a_model_with_per_layer_expert_counts(per_layer_llama_dir, heldout_files, tmp_path):
    out = tmp_path / "report"
    argv = ["--model", f"moe={per_layer_llama_dir}", "--output_dir", str(out), "--cutoff_len", "16",
            "--max_tokens", "40", "--old_languages", "en"]
    for lang, path in heldout_files.items():
        argv += ["--heldout", f"{lang}={path}"]
    assert eval_main(argv) == 0
    routing = json.loads((out / "routing.json").read_text())["moe"]
    assert (routing["layers"], routing["num_experts"]) == ([0, 2, 3], [2, 3, 3])
    for lang in ("en", "hu"):
        assert [len(p) for p in routing["languages"][lang]["mean_router_prob"]] == [2, 3, 3]
    assert matplotlib.image.imread(out / "routing_heatmap.png").shape[0] > 300
    assert check_report(out, models=["moe"], languages=["en", "hu"]) == []

    routing["num_experts"] = 3  # the per-layer lists no longer match what the entry says
    (out / "routing.json").write_text(json.dumps({"moe": routing}))
    problem = "router probabilities do not list each layer's experts"
    assert check_report(out) == [f"moe/{lang}: {problem}" for lang in ("en", "hu")]


def test_bootstrap_intervals_cover_the_truth_at_their_level():
    """Blocks whose per-token loss is drawn around a known mean: the 95% perplexity interval covers exp(mean) in
    about 95% of repeated samples, and a paired change between two models differing by a known factor covers it."""
    from moelpr.evaluation.intervals import change_interval, perplexity_interval

    rng = np.random.default_rng(0)
    covered_ppl = covered_change = 0
    experiments = 200
    for _ in range(experiments):
        tokens = np.full(64, 255)
        per_token = rng.normal(3.0, 0.4, size=64)  # per-block mean loss; true mean 3.0
        nll = per_token * tokens
        low, high = perplexity_interval(nll, tokens, samples=500, seed=int(rng.integers(1 << 30)))
        covered_ppl += low <= math.exp(3.0) <= high
        other = nll + tokens * (0.05 + rng.normal(0, 0.02, size=64))  # the other model: log-ppl +0.05 on average
        low, high = change_interval((nll, tokens), (other, tokens), paired=True, samples=500)
        covered_change += low <= math.expm1(0.05) <= high
    assert 0.88 <= covered_ppl / experiments <= 0.99
    assert 0.88 <= covered_change / experiments <= 0.99


def test_paired_resampling_separates_what_unpaired_cannot():
    """A small, consistent difference between two models on the same blocks is real; the text-to-text spread of
    perplexity hides it unless both models are resampled on the same draw."""
    from moelpr.evaluation.intervals import change_interval

    rng = np.random.default_rng(1)
    tokens = np.full(64, 255)
    nll = rng.normal(3.0, 0.5, size=64) * tokens
    other = nll + 0.01 * tokens
    paired = change_interval((nll, tokens), (other, tokens), paired=True)
    unpaired = change_interval((nll, tokens), (other, tokens), paired=False)
    assert paired[0] > 0  # the 1% increase is significant when paired
    assert unpaired[0] < 0 < unpaired[1]  # and drowned in the spread otherwise


def test_comparison_table_and_tradeoff_picture(tiny_llama_dir, upcycled_llama_dir, heldout_files, tmp_path, capsys):
    """The comparison reads the eval report and each method's runs; parameter counts come from the checkpoints."""
    from transformers import AutoModelForCausalLM

    from moelpr_lab.comparison import main as compare_main
    from moelpr_lab.comparison import parameter_counts

    out = tmp_path / "eval"
    argv = ["--model", f"base={tiny_llama_dir}", "--model", f"full_ft={tiny_llama_dir}",
            "--model", f"moe={upcycled_llama_dir}", "--output_dir", str(out), "--cutoff_len", "8",
            "--max_tokens", "40", "--old_languages", "en"]
    for lang, path in heldout_files.items():
        argv += ["--heldout", f"{lang}={path}"]
    assert eval_main(argv) == 0
    # The reference must have gained something for the share to be defined: make full_ft a little better on hu.
    report = json.loads((out / "perplexity.json").read_text())
    cell = report["models"]["full_ft"]["languages"]["hu"]
    cell["document_nll"] = [0.9 * v for v in cell["document_nll"]]
    (out / "perplexity.json").write_text(json.dumps(report))

    run, log = tmp_path / "run", tmp_path / "run.log"
    run.mkdir()
    state = {"global_step": 4, "log_history": [{"step": 4, "loss": 1.0}, {"step": 4, "train_runtime": 10.0}]}
    (run / "trainer_state.json").write_text(json.dumps(state))
    log.write_text("[INFO] trainable params: 1,234 || all params: 99,999 || trainable%: 1.2340\n")
    methods = tmp_path / "methods.json"
    methods.write_text(json.dumps({"base": "base", "reference": "full_ft", "methods": [
        {"name": "moe", "label": "MoE-LPR", "runs": [str(run)], "logs": [str(log)], "seeds": ["full_ft"]}]}))
    assert compare_main(["--eval_dir", str(out), "--methods", str(methods), "--output_dir", str(tmp_path / "cmp")]) == 0

    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    row = result["methods"][0]
    moe = AutoModelForCausalLM.from_pretrained(upcycled_llama_dir)
    expert = sum(p.numel() for p in moe.moe_blocks()[0].original_expert.parameters())
    total = sum(p.numel() for p in moe.parameters())
    assert (row["total_params"], row["active_params"]) == (total, total - 4 * 2 * expert)  # top-2 of 4, 4 layers
    assert parameter_counts(tiny_llama_dir)[0] == parameter_counts(tiny_llama_dir)[1]  # dense: all active
    assert row["trainable_params"] == 1234 and row["train_seconds"] / row["train_steps"] == 2.5
    # The upcycled model computes the dense function: no change, and none of full_ft's 10% gain on hu.
    assert abs(row["languages"]["hu"]["change"]) < 1e-4
    assert abs(row["languages"]["hu"]["gain_share"][0]) < 1e-3
    assert "| MoE-LPR |" in (tmp_path / "cmp" / "comparison.md").read_text()
    # A second seed (here the full_ft model standing in for one): its mean changes, by hand, beside the first's.
    base_hu = report["models"]["base"]["languages"]["hu"]
    by_hand = math.exp((sum(cell["document_nll"]) - sum(base_hu["document_nll"])) / sum(cell["document_tokens"])) - 1
    assert list(row["seeds"]) == ["moe", "full_ft"]
    assert row["seeds"]["full_ft"]["new"] == pytest.approx(by_hand) and by_hand < -0.3
    assert row["seeds"]["moe"]["new"] == pytest.approx(row["new_mean_change"][0])
    assert "| MoE-LPR | 2 |" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert matplotlib.image.imread(tmp_path / "cmp" / "tradeoff.png").shape[0] > 300

    # A model evaluated on fewer documents than the base is refused in one line, not mispaired.
    for key in ("document_nll", "document_tokens", "document_ids"):
        cell[key] = cell[key][:-1]
    (out / "perplexity.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert compare_main(["--eval_dir", str(out), "--methods", str(methods), "--output_dir", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "different documents" in err and len(err.splitlines()) == 1


def test_eval_reports_the_fusion_weights_of_a_moect_model(tiny_llama_dir, moect_llama_dir, heldout_files, tmp_path):
    # A fusion bias of (0, ln 3) puts weight 3/4 on the frozen FFN for every token in layer 2; the others keep
    # the upcycled zero fusion layer (weight 1/2).
    tuned = tmp_path / "ct_tuned"
    model = AutoModelForCausalLM.from_pretrained(moect_llama_dir)
    with torch.no_grad():
        model.model.layers[2].mlp.fusion.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    model.save_pretrained(tuned)
    AutoTokenizer.from_pretrained(moect_llama_dir).save_pretrained(tuned)

    out = tmp_path / "report"
    argv = ["--model", f"dense={tiny_llama_dir}", "--model", f"ct={tuned}", "--output_dir", str(out),
            "--cutoff_len", "16", "--max_tokens", "40", "--old_languages", "en"]
    for lang, path in heldout_files.items():
        argv += ["--heldout", f"{lang}={path}"]
    assert eval_main(argv) == 0

    report = json.loads((out / "perplexity.json").read_text())
    for lang in ("en", "hu"):  # the routed experts are still copies of the FFN: the dense function
        assert report["models"]["ct"]["languages"][lang]["perplexity"] == pytest.approx(
            report["models"]["dense"]["languages"][lang]["perplexity"], rel=1e-4
        )
    entry = json.loads((out / "routing.json").read_text())["ct"]
    assert (entry["method"], entry["num_experts"], entry["top_k"], entry["layers"]) == ("ct", 2, 1, [0, 1, 2, 3])
    for lang in ("en", "hu"):
        stats = entry["languages"][lang]
        assert "expert0_top1_share" not in stats  # MoE-CT's expert 0 is a routed copy, not the original FFN
        assert stats["ffn_fusion_weight"] == pytest.approx([0.5, 0.5, 0.75, 0.5], abs=1e-6)
        assert all(len(t) == 2 and sum(t) == pytest.approx(1.0) for t in stats["top1_share"])
    assert matplotlib.image.imread(out / "routing_heatmap.png").shape[0] > 300
    assert check_report(out, models=["dense", "ct"], languages=["en", "hu"]) == []

    routing = json.loads((out / "routing.json").read_text())
    routing["ct"]["languages"]["hu"]["ffn_fusion_weight"][0] = 1.5
    (out / "routing.json").write_text(json.dumps(routing))
    assert check_report(out) == ["ct/hu: ffn_fusion_weight outside [0, 1]"]


def test_bootstrap_resamples_documents_not_blocks():
    """Eight documents of eight blocks each, the blocks of one document identical (as the blocks of one help page
    are alike): resampling the 64 blocks as if independent gives a narrower interval than the data allow; the
    evaluation's unit, the document, gives the wider one."""
    from moelpr.evaluation.intervals import perplexity_interval

    rng = np.random.default_rng(2)
    per_document = rng.normal(3.0, 0.4, size=8)
    block_nll, block_tokens = np.repeat(per_document, 8) * 256, np.full(64, 256)
    document_nll, document_tokens = per_document * 256 * 8, np.full(8, 256 * 8)
    blocks = perplexity_interval(block_nll, block_tokens)
    documents = perplexity_interval(document_nll, document_tokens)
    assert math.exp(per_document.mean()) == pytest.approx(math.exp(document_nll.sum() / document_tokens.sum()))
    assert (documents[1] - documents[0]) > 2 * (blocks[1] - blocks[0])


def test_packed_blocks_credit_each_token_to_its_document(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    from moelpr.evaluation.perplexity import packed_blocks

    texts = TEXTS["en"][:4]
    blocks, owners = packed_blocks(tokenizer, texts, cutoff_len=48)
    result = evaluate_language(model, blocks, batch_size=3, is_moe=False, token_documents=owners)
    lengths = [len(tokenizer(t + tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for t in texts]
    assert len(blocks) >= 2 and lengths[0] < 48 < lengths[0] + lengths[1]  # the second text spans two blocks
    block_starts = set(range(0, sum(lengths), 48))  # a block's first token is not predicted
    starts = np.cumsum([0] + lengths)
    expected_tokens = [sum(1 for i in range(a, b) if i not in block_starts) for a, b in zip(starts[:-1], starts[1:])]
    assert result.document_indices == [0, 1, 2, 3] and result.document_tokens == expected_tokens
    assert math.fsum(result.document_nll) == pytest.approx(result.nll_sum, rel=1e-9)
    # The first text opens the first block, so its loss is the model's on the text alone.
    first = blocks[0][: lengths[0]]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([first]), labels=torch.tensor([first])).loss.item()
    assert result.document_nll[0] == pytest.approx(loss * (lengths[0] - 1), rel=1e-4)


def test_mean_over_languages_resamples_translated_pages_jointly():
    """Two languages whose per-page changes are the same (the same pages, translated): the joint draw keeps them
    together, so the mean's interval is that of one language, not the sqrt(2)-narrower one of independent draws."""
    from moelpr.evaluation.intervals import change_interval, mean_change_interval

    rng = np.random.default_rng(3)
    pages = [f"text/page{i}.xhp" for i in range(40)]
    tokens = np.full(40, 500)
    base = rng.normal(3.0, 0.3, size=40) * tokens
    other = base + tokens * rng.normal(0.02, 0.05, size=40)
    language = ((base, tokens, pages), (other, tokens, pages))
    one = change_interval(language[0], language[1], paired=True)
    joint = mean_change_interval([language, language])
    renamed = [f"hu/{p}" for p in pages]  # no page in common: drawn independently
    independent = mean_change_interval([language, ((base, tokens, renamed), (other, tokens, renamed))])
    assert joint[2] - joint[1] == pytest.approx(one[1] - one[0], rel=0.15)  # same width, up to bootstrap noise
    assert (independent[2] - independent[1]) < 0.85 * (joint[2] - joint[1])


@pytest.mark.parametrize("function", ["mean_change_interval", "gain_share_interval", "change_interval"])
def test_comparing_models_on_different_documents_is_refused_in_one_line(function):
    from moelpr.evaluation import intervals

    tokens = [100] * 6
    base = ([300.0, 310, 290, 305, 295, 300], tokens, [f"p{i}" for i in range(6)])
    cut = (base[0][:5], tokens[:5], base[2][:5])  # one document fewer: pairing by position would mispair
    call = {
        "mean_change_interval": lambda: intervals.mean_change_interval([(base, base), (base, cut)]),
        "gain_share_interval": lambda: intervals.gain_share_interval(base, base, cut),
        "change_interval": lambda: intervals.change_interval(base, cut, paired=True),
    }[function]
    with pytest.raises(intervals.MismatchedDocuments) as error:
        call()
    assert "different documents" in str(error.value) and len(str(error.value).splitlines()) == 1


def test_report_header_says_paired_only_when_the_models_saw_the_same_documents():
    from moelpr.evaluation.report import _perplexity_markdown, _with_intervals

    def cell(ids):
        nll, tokens = [300.0 + 10 * i for i in range(len(ids))], [100] * len(ids)
        return {"perplexity": math.exp(sum(nll) / sum(tokens)), "document_nll": nll, "document_tokens": tokens,
                "document_ids": ids, "predicted_tokens": sum(tokens)}

    settings = {"bootstrap": {"level": 0.95}, "cutoff_len": 256, "dtype": "float32"}
    same, other = ["a", "b", "c", "d"], ["a", "b", "c", "e"]
    for ids, header in ((same, "paired over the same documents]"), (other, "resampled independently")):
        results = {name: {"languages": {"hu": cell(doc_ids)}, "eval_tokens_per_second": 1.0}
                   for name, doc_ids in (("base", same), ("model", ids))}
        _with_intervals(results, ["hu"])
        assert results["model"]["languages"]["hu"]["change_vs_baseline"]["paired"] == (ids == same)
        assert header in _perplexity_markdown(results, ["hu"], set(), settings)


def test_mean_change_interval_is_finite_when_a_language_has_pages_of_its_own():
    """General English (fortunes) shares no page with the help pages; a joint draw that misses its only document
    averages over the languages it holds instead of turning the interval into NaN."""
    from moelpr.evaluation.intervals import mean_change_interval

    one_page = (([10.0], [5], ["page"]), ([9.0], [5], ["page"]))
    fortunes = (([3.0, 4.0, 5.0], [2, 2, 2], ["f1", "f2", "f3"]), ([3.3, 4.1, 5.2], [2, 2, 2], ["f1", "f2", "f3"]))
    point, low, high = mean_change_interval([one_page, fortunes])
    assert math.isfinite(low) and math.isfinite(high) and low <= point <= high
