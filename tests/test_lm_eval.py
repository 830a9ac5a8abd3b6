"""lm-evaluation-harness evaluates MoE-LPR checkpoints through its own, unchanged command line.

`lm_eval --model hf` runs in a fresh process that never imports moelpr (the startup hook registers the model
types when lm-eval's AutoConfig looks the checkpoint up), on local tasks written here, so nothing is downloaded.
Its numbers are checked against log-likelihoods computed directly with transformers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from llamafactory_cli import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

LM_EVAL = shutil.which("lm_eval")
PERPLEXITY_TASK = "moelpr_test_perplexity"
CHOICE_TASK = "moelpr_test_choice"
PERPLEXITY_DOCS = [REPO / "data" / f"{name}.jsonl" for name in ("old_en", "new_hu", "new_tr")]
CHOICE_DOCS = [
    {"question": "The river runs past the old", "choices": ["mill", "library", "train"], "answer": 0},
    {"question": "Good bread needs flour, water, salt and", "choices": ["time", "snow", "tea"], "answer": 0},
    {"question": "A könyvtár reggel kilenckor", "choices": ["nyit", "alszik", "repül"], "answer": 0},
    {"question": "A vonatunk a síneken lévő hó miatt", "choices": ["késett", "evett", "nevetett"], "answer": 0},
    {"question": "Türkçe: hızlı kahverengi", "choices": ["tilki", "kenyér", "masa", "deniz"], "answer": 0},
    {"question": "Ελληνικά: η γρήγορη καφέ", "choices": ["αλεπού", "θάλασσα"], "answer": 0},
]

# Checkpoints lm-eval evaluates, from the session's trained outputs. Each must reproduce the numbers computed
# directly from the native stage-2 checkpoint, so a converted copy of it is one more entry here.
def _mixtral_export(stage_outputs: dict[str, Path]) -> Path:
    from moelpr.export.transformers_moe import export

    out = stage_outputs["tmp"] / "stage2_mixtral_for_lm_eval"
    return out if (out / "config.json").is_file() else export(stage_outputs["stage2"], out)


def _merged_whole(stage_outputs: dict[str, Path]) -> Path:
    """The slim stage-2 output (routers and a reference) written whole by ``moelpr merge``."""
    from moelpr.checkpoints.merge import merge

    out = stage_outputs["tmp"] / "stage2_whole_for_lm_eval"
    return out if (out / "config.json").is_file() else merge(stage_outputs["stage2"], out)


# "native" is the slim stage-2 output and "merged_whole" the same model whole: both must give these numbers.
EVALUATED: dict[str, Callable[[dict[str, Path]], Path]] = {
    "native": lambda stage_outputs: stage_outputs["stage2"],
    "merged_whole": _merged_whole,
    "mixtral_export": _mixtral_export,
}


def _metric(name: str, aggregation: str, higher_is_better: bool) -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """An --include_path folder: a rolling-loglikelihood (perplexity) task and a multiple-choice task."""
    tasks = tmp_path_factory.mktemp("lm_eval_tasks")
    choice_docs = tasks / "choice.jsonl"
    choice_docs.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in CHOICE_DOCS))
    perplexity = {
        "task": PERPLEXITY_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": [str(path) for path in PERPLEXITY_DOCS]}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            _metric("word_perplexity", "weighted_perplexity", False),
            _metric("byte_perplexity", "weighted_perplexity", False),
            _metric("bits_per_byte", "bits_per_byte", False),
        ],
    }
    choice = {
        "task": CHOICE_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(choice_docs)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [_metric("acc", "mean", True), _metric("acc_norm", "mean", True)],
    }
    for config in (perplexity, choice):
        (tasks / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return tasks


def run_lm_eval(model_dir: Path, tasks: list[str], task_dir: Path, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """Run the `lm_eval` command line on ``model_dir`` offline, with samples logged under ``out``; its results.
    ``extra``: more command-line arguments."""
    assert LM_EVAL, "lm_eval is not installed: pip install -r requirements.txt"
    command = [
        LM_EVAL,
        "--model", "hf",
        "--model_args", f"pretrained={model_dir}",
        "--tasks", ",".join(tasks),
        "--include_path", str(task_dir),
        "--device", "cpu",
        "--batch_size", "8",
        "--output_path", str(out),
        "--log_samples",
        *extra,
    ]  # fmt: skip
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "datasets")}
    run = subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, **offline})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (results_file,) = out.glob("*/results_*.json")
    return json.loads(results_file.read_text())["results"]


@pytest.fixture(scope="module", params=list(EVALUATED))
def lm_eval_run(request, stage_outputs, task_dir, tmp_path_factory) -> tuple[dict, list[dict]]:
    """lm-eval's results and its per-document multiple-choice samples for one evaluated checkpoint."""
    out = tmp_path_factory.mktemp("lm_eval_out")
    results = run_lm_eval(EVALUATED[request.param](stage_outputs), [PERPLEXITY_TASK, CHOICE_TASK], task_dir, out)
    (choice_samples,) = out.glob(f"*/samples_{CHOICE_TASK}_*.jsonl")
    return results, [json.loads(line) for line in choice_samples.open()]


@pytest.fixture(scope="module")
def native_stage2(stage_outputs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(stage_outputs["stage2"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(stage_outputs["stage2"])


@torch.no_grad()
def log_likelihood(model: PreTrainedModel, context: list[int], tokens: list[int]) -> float:
    """Log-probability of ``tokens`` following ``context``, computed directly with transformers."""
    ids = torch.tensor([context + tokens])
    log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    return log_probs[len(context) - 1 :].gather(-1, ids[0, len(context) :, None]).sum().item()


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def assert_perplexity_is_the_models_own(results: dict, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
    texts = [json.loads(line)["text"] for path in PERPLEXITY_DOCS for line in path.read_text().splitlines()]
    # Each document is scored from a document boundary; the tiny tokenizer has no BOS token, so that is EOS.
    assert tokenizer.bos_token_id is None
    total = sum(log_likelihood(model, [tokenizer.eos_token_id], encode(tokenizer, text)) for text in texts)
    words = sum(len(text.split()) for text in texts)
    text_bytes = sum(len(text.encode()) for text in texts)
    got = results[PERPLEXITY_TASK]
    assert got["sample_len"] == len(texts)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-total / text_bytes), rel=1e-4)
    assert got["bits_per_byte,none"] == pytest.approx(-total / text_bytes / math.log(2), rel=1e-4)


def test_lm_eval_perplexity_is_the_models_own(lm_eval_run, native_stage2):
    assert_perplexity_is_the_models_own(lm_eval_run[0], *native_stage2)


def test_lm_eval_evaluates_a_moect_checkpoint(moect_llama_dir, task_dir, tmp_path):
    """A MoE-CT checkpoint whose routed experts and fusion layers differ from their upcycled start (as after
    training) loads in lm-eval like a MoE-LPR one and gets its own perplexity."""
    model = AutoModelForCausalLM.from_pretrained(moect_llama_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.moe_blocks():
            for expert in block.new_experts:
                expert.down_proj.weight.mul_(2.0)
            block.fusion.weight.copy_(torch.randn(block.fusion.weight.shape, generator=generator))
    model.save_pretrained(tmp_path / "moect")
    tokenizer = AutoTokenizer.from_pretrained(moect_llama_dir)
    tokenizer.save_pretrained(tmp_path / "moect")
    results = run_lm_eval(tmp_path / "moect", [PERPLEXITY_TASK], task_dir, tmp_path / "out")
    assert_perplexity_is_the_models_own(results, model.eval(), tokenizer)


def test_lm_eval_multiple_choice_scores_the_models_log_likelihoods(lm_eval_run, native_stage2):
    results, samples = lm_eval_run
    model, tokenizer = native_stage2
    scored = sorted(samples, key=lambda sample: sample["doc_id"])
    assert [sample["doc"] for sample in scored] == CHOICE_DOCS
    correct = correct_normalised = 0
    for sample, doc in zip(scored, CHOICE_DOCS):
        context = encode(tokenizer, doc["question"])
        # The answer follows the question after a space; its tokens are those the pair adds to the question's.
        expected = [
            log_likelihood(model, context, encode(tokenizer, f"{doc['question']} {choice}")[len(context) :])
            for choice in doc["choices"]
        ]
        got = [float(log_likelihood_and_greedy[0]) for log_likelihood_and_greedy in sample["filtered_resps"]]
        assert got == pytest.approx(expected, abs=1e-3)
        correct += max(range(len(expected)), key=expected.__getitem__) == doc["answer"]
        per_char = [ll / len(choice) for ll, choice in zip(expected, doc["choices"])]
        correct_normalised += max(range(len(per_char)), key=per_char.__getitem__) == doc["answer"]
    assert results[CHOICE_TASK]["acc,none"] == pytest.approx(correct / len(CHOICE_DOCS))
    assert results[CHOICE_TASK]["acc_norm,none"] == pytest.approx(correct_normalised / len(CHOICE_DOCS))
