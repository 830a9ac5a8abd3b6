"""``--num_experts auto:K``: LayerMoE's allocation rule, the similarity it rests on, and the one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TOKENIZER_TEXT
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelpr.cli.layer_allocation import main
from moelpr.models import MOE_FAMILIES
from moelpr.upcycling.layer_allocation import (
    ALLOCATION_FILE,
    AllocationError,
    allocate,
    allocate_new_experts,
    first_token_ids,
    layer_similarity,
    layer_spec,
    measure_similarity,
    parse_auto_budget,
    read_corpora,
)

# LayerMoE's released allocation for Llama-3.2-3B, old en/es/zh + new el/hu/tr (github.com/XZhang00/LayerMoE,
# similarity/llama3.2-3B-G1.xlsx): per layer, the mean of the new-new and new-old mean cosine similarities
# (column T, rounded here to 4 digits), and the experts per layer its training script
# (layermoe-llama/scripts-train/G1-stage1-6B-my-8GPUs.sh) uses: 56 new experts in all.
LAYERMOE_LLAMA32_SIMILARITY = [
    0.0359, 0.0402, 0.0352, 0.0503, 0.0636, 0.0698, 0.0842, 0.0960, 0.0945, 0.0978, 0.1060, 0.1094, 0.1164, 0.1074,
    0.1152, 0.1109, 0.0973, 0.0907, 0.0830, 0.0835, 0.0778, 0.0683, 0.0685, 0.0548, 0.0498, 0.0497, 0.0481, 0.0453,
]
LAYERMOE_LLAMA32_EXPERTS = [5, 5, 5, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4]


def _random_similarities(rng: random.Random, layers: int) -> list[float]:
    return [rng.uniform(0.02, 0.9) for _ in range(layers)]


def test_reproduces_the_authors_released_allocation():
    new_experts = allocate_new_experts(LAYERMOE_LLAMA32_SIMILARITY, budget=56)
    assert [n + 1 for n in new_experts] == LAYERMOE_LLAMA32_EXPERTS


@pytest.mark.parametrize("budget", [1, 5, 11, 12, 30, 97, 1000])
def test_counts_sum_to_the_budget_and_follow_similarity(budget):
    rng = random.Random(budget)
    for _ in range(20):
        sims = _random_similarities(rng, 12)
        new = allocate_new_experts(sims, budget)
        assert sum(new) == budget and min(new) >= 0
        for a in range(12):
            for b in range(12):
                if sims[a] < sims[b]:
                    assert new[a] >= new[b], (sims, new)


def test_is_layermoe_ceil_rule_for_some_scale():
    # LayerMoE: experts_i = ceil(C * w_i / sum(w)), w = 1/similarity. Our counts must be that for some C,
    # i.e. some D = sum(w)/C with experts_i - 1 < w_i / D <= experts_i for every layer.
    rng = random.Random(0)
    for budget in (3, 20, 200):
        sims = _random_similarities(rng, 16)
        experts = [n + 1 for n in allocate_new_experts(sims, budget)]
        weights = [1 / s for s in sims]
        lowest_upper = min(w / (e - 1) for w, e in zip(weights, experts) if e > 1)
        highest_lower = max(w / e for w, e in zip(weights, experts))
        assert highest_lower < lowest_upper


def test_more_budget_never_takes_an_expert_away():
    sims = _random_similarities(random.Random(1), 10)
    previous = allocate_new_experts(sims, 1)
    for budget in range(2, 60):
        current = allocate_new_experts(sims, budget)
        assert all(c >= p for c, p in zip(current, previous)) and sum(current) == sum(previous) + 1
        previous = current


def test_ties_and_small_budgets():
    assert allocate_new_experts([0.3] * 4, 2) == [1, 1, 0, 0]  # exact ties: lower layer first
    assert allocate_new_experts([0.3] * 4, 6) == [2, 2, 1, 1]
    assert allocate_new_experts([0.3, 0.6, 0.6, 0.2], 2) == [1, 0, 0, 1]
    # A layer far less similar than the rest can take a second new expert before others get a first.
    assert allocate_new_experts([0.05, 0.5, 0.5, 0.5], 2) == [2, 0, 0, 0]
    # 0.4 * 2 == 0.8 * 1 exactly: the tie goes to layer 0.
    assert allocate_new_experts([0.4, 0.8], 2) == [2, 0]


def test_candidate_layers_and_bad_inputs():
    sims = [0.1, 0.2, -0.5, 0.4]
    assert allocate_new_experts(sims, 5, layers=[1, 3]) == [0, 4, 0, 1]  # layer 2 is no candidate: its value is moot
    with pytest.raises(AllocationError, match="positive similarities, got layer 2"):
        allocate_new_experts(sims, 5)
    with pytest.raises(AllocationError, match="positive similarities"):
        allocate_new_experts([0.1, float("nan")], 5)
    with pytest.raises(AllocationError, match="outside 0..3"):
        allocate_new_experts(sims, 5, layers=[4])
    for budget in (0, -1, True, 2.0):
        with pytest.raises(AllocationError, match="whole number K >= 1"):
            allocate_new_experts([0.1, 0.2], budget)


def test_auto_spec_parsing_and_explicit_form():
    assert parse_auto_budget("auto:30") == 30 and parse_auto_budget(" AUTO: 7") == 7
    assert parse_auto_budget("4") is None and parse_auto_budget("0-9:2,10-29:4") is None
    for bad in ("auto:0", "auto:-3", "auto:x", "auto:"):
        with pytest.raises(AllocationError, match="K >= 1"):
            parse_auto_budget(bad)
    assert layer_spec([0, 1, 2, 5, 6, 8], [3, 3, 2, 2, 2, 2]) == "0-1:3,2:2,5-6:2,8:2"


def test_group_similarity_averages_pair_means():
    torch.manual_seed(0)
    new = {name: F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1) / 2 for name in ("hu", "tr", "el")}
    old = {name: F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1) / 3 for name in ("en", "es")}
    sim = layer_similarity(new, old)
    for layer in range(3):
        def dot(x, y):
            return float(sum(x[layer][k] * y[layer][k] for k in range(8)))
        new_old = sum(dot(new[a], old[b]) for a in new for b in old) / 6
        new_new = (dot(new["hu"], new["tr"]) + dot(new["hu"], new["el"]) + dot(new["tr"], new["el"])) / 3
        assert sim.values[layer] == pytest.approx((new_old + new_new) / 2, abs=1e-12)
        assert sim.pairs[("hu", "es")][layer] == pytest.approx(dot(new["hu"], old["es"]), abs=1e-12)
    single = layer_similarity({"hu": new["hu"]}, old)
    assert single.new_new is None and single.values == single.new_old


def _write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def corpora(tmp_path) -> dict[str, Path]:
    en, hu, tr, el = TOKENIZER_TEXT[0:2], [TOKENIZER_TEXT[2]], [TOKENIZER_TEXT[3]], [TOKENIZER_TEXT[4]]
    # Documents of different lengths, so batches hold padding.
    return {
        "en": _write_corpus(tmp_path / "en.jsonl", [en[0], en[1] + " " + en[0], en[1][:20]]),
        "hu": _write_corpus(tmp_path / "hu.jsonl", [hu[0], hu[0] + " " + hu[0], hu[0][:15]]),
        "tr": _write_corpus(tmp_path / "tr.jsonl", [tr[0] * 2, tr[0][:30]]),
        "el": _write_corpus(tmp_path / "el.jsonl", [el[0], el[0][:25]]),
    }


def _ffn_inputs_one_document_at_a_time(model, tokenizer, path: Path) -> list[torch.Tensor]:
    """Per layer, the FFN inputs of every token of a corpus, computed without hooks or padding: attention
    applied by hand to the layer inputs the model reports, the result checked against the next layer input."""
    decoder = model.get_decoder()
    per_layer = [[] for _ in decoder.layers]
    for line in path.read_text(encoding="utf-8").splitlines():
        ids = torch.tensor([tokenizer(json.loads(line)["text"])["input_ids"]])
        length = ids.shape[1]
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        rope = decoder.rotary_emb(hidden[0], torch.arange(length)[None])
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        for i, layer in enumerate(decoder.layers):
            after_attention = hidden[i] + layer.self_attn(layer.input_layernorm(hidden[i]), rope, causal)[0]
            ffn_input = layer.post_attention_layernorm(after_attention)
            if i + 1 < len(decoder.layers):  # the last reported state is after the final norm
                torch.testing.assert_close(after_attention + layer.mlp(ffn_input), hidden[i + 1], atol=1e-5, rtol=1e-5)
            per_layer[i].append(ffn_input[0])
    return [torch.cat(states) for states in per_layer]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_similarity_matches_the_authors_pairwise_computation(family, corpora, tiny_llama_dir, tiny_qwen2_dir):
    model_dir = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[family]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenized = read_corpora(tokenizer, [corpora["hu"], corpora["tr"]], [corpora["en"]])
    similarity = measure_similarity(model, tokenized, batch_size=2)

    states = {name: _ffn_inputs_one_document_at_a_time(model, tokenizer, corpora[name]) for name in ("hu", "tr", "en")}
    assert [(c.name, c.role, c.tokens) for c in tokenized] == [(n, r, states[n][0].shape[0]) for n, r in
                                                               (("hu", "new"), ("tr", "new"), ("en", "old"))]
    for layer in range(model.config.num_hidden_layers):
        def mean_cosine(a, b):
            # The authors' measure: mean of the full token x token cosine matrix.
            return float((F.normalize(states[a][layer], dim=-1) @ F.normalize(states[b][layer], dim=-1).T).mean())
        for a, b in (("hu", "en"), ("tr", "en"), ("hu", "tr")):
            assert similarity.pairs[(a, b)][layer] == pytest.approx(mean_cosine(a, b), abs=1e-5)
        expected = (mean_cosine("hu", "tr") + (mean_cosine("hu", "en") + mean_cosine("tr", "en")) / 2) / 2
        assert similarity.values[layer] == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def anisotropic_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny LLaMA with a direction shared by every token's embedding. Trained LLMs' hidden states share
    one (so LayerMoE's similarities are positive); a random model's do not, and the rule refuses those."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight += 0.1 * F.normalize(torch.ones(model.config.hidden_size), dim=0)
    path = tmp_path_factory.mktemp("anisotropic_llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


def test_allocation_is_deterministic_and_fits_the_config(corpora, anisotropic_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(anisotropic_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(anisotropic_llama_dir)
    runs = [
        allocate(model, tokenizer, 5, [corpora["hu"], corpora["el"]], [corpora["en"]], batch_size=size)
        for size in (3, 3, 1)
    ]
    assert runs[0].similarity.values == runs[1].similarity.values  # bit for bit
    assert runs[0].new_experts == runs[1].new_experts == runs[2].new_experts
    assert runs[2].similarity.values == pytest.approx(runs[0].similarity.values, abs=1e-6)  # batching: rounding only

    allocation = runs[0]
    config_class, _ = MOE_FAMILIES["llama"]
    config = config_class.from_dense(
        model.config, num_experts=allocation.num_experts, moe_layers=allocation.moe_layers, num_experts_per_tok=2
    )
    assert [config.num_experts_of(i) for i in config.moe_layer_indices] == allocation.num_experts
    assert sum(n - 1 for n in allocation.num_experts) == 5


def test_token_budget_and_document_cut(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = [TOKENIZER_TEXT[0] * 3, TOKENIZER_TEXT[1], TOKENIZER_TEXT[2], TOKENIZER_TEXT[3]]
    full = [tokenizer(t)["input_ids"] for t in texts]
    assert len(full[0]) > 16 and len(full[1]) > 16 and len(full[2]) > 5
    docs = first_token_ids(tokenizer, texts, max_tokens=16 + 16 + 5, max_length=16)
    # Each document cut to max_length; the budget ends inside the third; the fourth is never read.
    assert docs == [full[0][:16], full[1][:16], full[2][:5]]


def test_cli_writes_the_allocation(corpora, anisotropic_llama_dir, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["--model_path", str(anisotropic_llama_dir), "--num_experts", "auto:7", "--output_dir", str(out),
            "--new_corpus", f"{corpora['hu']},{corpora['tr']}", "--old_corpus", str(corpora["en"])]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / ALLOCATION_FILE).read_text())
    assert saved["budget"] == 7 and sum(layer["new_experts"] for layer in saved["layers"]) == 7
    assert sum(n - 1 for n in saved["num_experts"]) == 7 and f"--num_experts {saved['spec']}" in printed
    assert set(saved["corpora"]) == {"hu", "tr", "en"} and saved["corpora"]["en"]["role"] == "old"


@pytest.mark.parametrize(
    "case,change,message",
    [
        ("not auto", {"--num_experts": "4"}, "--num_experts must be auto:K here"),
        ("zero budget", {"--num_experts": "auto:0"}, "K >= 1"),
        ("no new corpus", {"--new_corpus": ""}, "needs --new_corpus"),
        ("missing file", {"--old_corpus": "{tmp}/nope.jsonl"}, "--old_corpus: no such file"),
        ("new and old", {"--old_corpus": "{hu}"}, "is given as both a new and an old corpus"),
        ("file twice", {"--new_corpus": "{hu},{hu}"}, "--new_corpus names a file twice"),
        ("bad jsonl", {"--old_corpus": "{bad}"}, "bad.jsonl:2 is not a JSON object"),
        ("empty corpus", {"--old_corpus": "{empty}"}, "holds no text to measure"),
        ("no model", {"--model_path": "{tmp}"}, "is not a model directory"),
    ],
)
def test_bad_requests_get_one_clear_line(case, change, message, corpora, tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    values = {"tmp": tmp_path, "hu": corpora["hu"], "bad": tmp_path / "bad.jsonl", "empty": tmp_path / "empty.jsonl"}
    argv = {"--model_path": str(tiny_llama_dir), "--num_experts": "auto:3", "--new_corpus": str(corpora["hu"]),
            "--old_corpus": str(corpora["en"])}
    argv.update({key: value.format(**values) for key, value in change.items()})
    assert main([item for pair in argv.items() for item in pair]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # progress bars share stderr
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert "similarity:" not in err  # refused before any forward pass


def test_upcycle_auto_budget_end_to_end(corpora, anisotropic_llama_dir, tmp_path, capsys):
    """`moelpr upcycle --num_experts auto:K`: the measured allocation becomes the checkpoint's layout, is saved
    beside it, and the upcycled model still computes the dense function."""
    from moelpr.cli.upcycle import main

    out = tmp_path / "auto"
    args = ["--model_path", str(anisotropic_llama_dir), "--output_path", str(out), "--num_experts", "auto:5",
            "--new_corpus", f"{corpora['hu']},{corpora['el']}", "--old_corpus", str(corpora["en"])]
    assert main(args) == 0
    saved = json.loads((out / "layer_allocation.json").read_text())
    config = json.loads((out / "config.json").read_text())
    layers = config["moe_layers"] if config["moe_layers"] is not None else list(range(config["num_hidden_layers"]))
    counts = config["num_experts"] if isinstance(config["num_experts"], list) else [config["num_experts"]] * len(layers)
    assert layers == saved["moe_layers"] and counts == saved["num_experts"]
    assert sum(n - 1 for n in counts) == 5
    dense = AutoModelForCausalLM.from_pretrained(anisotropic_llama_dir).eval()
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(2, dense.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (moe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() <= 1e-5

    for bad, message in (
        (["--num_experts", "auto:5"], "needs --new_corpus"),
        (["--num_experts", "4", "--new_corpus", str(corpora["hu"])], "only with --num_experts auto:K"),
        (args[4:] + ["--topk", "3"], "top-k can be at most 2"),
    ):
        target = tmp_path / "never"
        assert main(["--model_path", str(anisotropic_llama_dir), "--output_path", str(target), *bad]) == 2
        assert message in capsys.readouterr().err
        assert not target.exists()
