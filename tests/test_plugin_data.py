"""The language mask through LLaMA-Factory's real pt data pipeline (parsing, packing, caching, collating).

Old-language documents are ASCII letters and new-language documents Greek letters, so every token
tells on its own which document it came from: the oracle for the mask needs no knowledge of packing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llamafactory.data import get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
from llamafactory.train.pt import workflow

from moelpr.llamafactory_plugin import apply

apply()  # what the startup hook does in llamafactory-cli

OLD_DOCS = ["thequickbrownfoxjumpsoverthelazydog" * (i + 1) for i in range(5)]
NEW_DOCS = ["ηγρήγορηκαφέαλεπούπηδάπάνω" * (i + 1) for i in range(5)]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lang_data")
    for name, docs in (("old", OLD_DOCS), ("new", NEW_DOCS)):
        (path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    info = {
        name: {"file_name": f"{name}.jsonl", "language": name, "columns": {"prompt": "text"}} for name in ("old", "new")
    }
    info["untagged"] = {"file_name": "new.jsonl", "columns": {"prompt": "text"}}
    (path / "dataset_info.json").write_text(json.dumps(info))
    return path


def _load(upcycled_llama_dir, dataset_dir, tmp_path, **overrides):
    args = {
        "model_name_or_path": str(upcycled_llama_dir),
        "stage": "pt",
        "do_train": True,
        "finetuning_type": "moelpr",
        "moelpr_stage": "review",
        "generate_lang_mask": True,
        "dataset": "new,old",
        "dataset_dir": str(dataset_dir),
        "cutoff_len": 17,
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "hf_cache"),
        "use_cpu": True,
        "report_to": "none",
    }
    args.update(overrides)
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset_module = workflow.get_dataset(template, model_args, data_args, training_args, "pt", **tokenizer_module)
    return dataset_module["train_dataset"], tokenizer_module["tokenizer"]


def _check_mask_follows_tokens(dataset, tokenizer) -> tuple[int, int]:
    """Assert the oracle on every token; return how many blocks there are and how many straddle an old
    and a new document."""
    blocks = straddling = 0
    for row in dataset:
        blocks += 1
        ids, mask = row["input_ids"], row["lang_mask"]
        assert len(ids) == len(mask)
        for pos, (token, flag) in enumerate(zip(ids, mask)):
            if token == tokenizer.eos_token_id:  # a document's end belongs to that document
                if pos > 0:
                    assert flag == mask[pos - 1]
                continue
            is_ascii = all(ord(c) < 128 for c in tokenizer.decode([token]))
            assert flag == int(is_ascii), (pos, tokenizer.decode([token]), flag)
        straddling += len(set(mask)) == 2
    return blocks, straddling


@pytest.mark.parametrize(
    "mix",
    [
        {"mix_strategy": "concat"},
        {"mix_strategy": "interleave_under", "interleave_probs": "0.5,0.5"},
        {"mix_strategy": "interleave_over", "interleave_probs": "0.3,0.7", "max_samples": 3},
        {
            "mix_strategy": "interleave_under",
            "interleave_probs": "0.5,0.5",
            "streaming": True,
            "max_steps": 5,
            "dataloader_num_workers": 1,
        },
        {"mix_strategy": "interleave_under", "interleave_probs": "0.5,0.5", "preprocessing_num_workers": 2},
    ],
    ids=["concat", "interleave_under", "interleave_over_max_samples", "streaming", "two_workers"],
)
def test_mask_follows_each_token_through_packing(upcycled_llama_dir, dataset_dir, tmp_path, mix):
    dataset, tokenizer = _load(upcycled_llama_dir, dataset_dir, tmp_path, **mix)
    blocks, straddling = _check_mask_follows_tokens(dataset, tokenizer)
    assert blocks > 3 and straddling >= 1


def test_block_straddling_an_old_and_a_new_document(upcycled_llama_dir, dataset_dir, tmp_path):
    dataset, tokenizer = _load(upcycled_llama_dir, dataset_dir, tmp_path, mix_strategy="concat")
    ids = [t for row in dataset for t in row["input_ids"]]
    mask = [m for row in dataset for m in row["lang_mask"]]
    # concat keeps order: the new documents come first, then the old ones, cut into equal blocks.
    size = len(dataset[0]["input_ids"])
    first_old = mask.index(1)
    assert set(mask[:first_old]) == {0} and set(mask[first_old:]) == {1}
    assert first_old % size != 0, "the fixture's documents should put a document boundary inside a block"
    block = dataset[first_old // size]
    assert block["lang_mask"] == [0] * (first_old % size) + [1] * (size - first_old % size)
    assert tokenizer.decode(ids[first_old - 1 : first_old]) == tokenizer.eos_token


def test_tokenized_path_keeps_the_mask_and_a_stale_cache_is_rejected(upcycled_llama_dir, dataset_dir, tmp_path):
    tokenized = tmp_path / "tokenized"
    built, _ = _load(upcycled_llama_dir, dataset_dir, tmp_path, tokenized_path=str(tokenized))
    reloaded, _ = _load(upcycled_llama_dir, dataset_dir, tmp_path, tokenized_path=str(tokenized))
    assert reloaded["lang_mask"] == built["lang_mask"] and reloaded["input_ids"] == built["input_ids"]

    stale = tmp_path / "stale"
    _load(
        upcycled_llama_dir,
        dataset_dir,
        tmp_path,
        tokenized_path=str(stale),
        moelpr_stage="post_pretrain",
        generate_lang_mask=False,
    )
    with pytest.raises(ValueError, match="has no `lang_mask`: it was tokenized without"):
        _load(upcycled_llama_dir, dataset_dir, tmp_path, tokenized_path=str(stale))


def test_review_on_tokenized_data_without_old_language_tokens_is_refused(upcycled_llama_dir, dataset_dir, tmp_path):
    """dataset_info.json is not read again for a tokenized dataset: the saved mask itself must show old tokens."""
    new_only = tmp_path / "new_only"
    _load(upcycled_llama_dir, dataset_dir, tmp_path, tokenized_path=str(new_only), moelpr_stage="post_pretrain",
          dataset="new")
    with pytest.raises(ValueError, match="has none \\(its `lang_mask` is 0 everywhere\\)"):
        _load(upcycled_llama_dir, dataset_dir, tmp_path, tokenized_path=str(new_only))


def test_without_generate_lang_mask_no_mask_is_built(upcycled_llama_dir, dataset_dir, tmp_path):
    dataset, _ = _load(
        upcycled_llama_dir,
        dataset_dir,
        tmp_path,
        dataset="untagged",
        moelpr_stage="post_pretrain",
        generate_lang_mask=False,
    )
    assert "lang_mask" not in dataset.column_names


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_pads_the_mask_like_the_tokens(upcycled_llama_dir, dataset_dir, tmp_path, padding_side):
    dataset, tokenizer = _load(upcycled_llama_dir, dataset_dir, tmp_path, packing=False, cutoff_len=40)
    rows = [dataset[i] for i in range(len(dataset))]
    assert len({len(r["input_ids"]) for r in rows}) > 1, "rows of different lengths are needed to pad"
    tokenizer.padding_side = padding_side
    collator = workflow.DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    batch = collator(rows)
    assert batch["lang_mask"].shape == batch["input_ids"].shape
    for row, ids, attention, mask in zip(rows, batch["input_ids"], batch["attention_mask"], batch["lang_mask"]):
        kept = attention.bool()
        assert ids[kept].tolist() == row["input_ids"]
        assert mask[kept].tolist() == row["lang_mask"]
        assert not mask[~kept].any()
        assert set(row["lang_mask"]) == {int(all(ord(c) < 128 for c in tokenizer.decode(row["input_ids"][:1])))}
    assert batch["lang_mask"].dtype == torch.long


def test_gemma3_packed_blocks_start_with_bos_and_documents_end_with_eos(gemma3_dense_dir):
    from types import SimpleNamespace

    from llamafactory.data.processor.pretrain import PretrainDatasetProcessor
    from transformers import AutoTokenizer

    # Gemma needs <bos> first; transformers 5.6 reloads its tokenizer with add_bos_token False, which
    # LLaMA-Factory reads, so without the plugin no block would start with bos.
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dense_dir)
    data_args = SimpleNamespace(template="default", packing=True, cutoff_len=8)
    processor = PretrainDatasetProcessor(template=None, tokenizer=tokenizer, processor=None, data_args=data_args)
    documents = ["The capital of France is Paris.", "Budapest is the capital of Hungary, on the Danube."]
    blocks = processor.preprocess_dataset({"_prompt": [[{"content": d}] for d in documents]})["input_ids"]
    stream = [token for doc in documents for token in tokenizer(doc, add_special_tokens=False)["input_ids"] + [1]]
    assert len(blocks) == len(stream) // 8 == 2
    for i, block in enumerate(blocks):
        # LLaMA-Factory overwrites each block's first token with bos; the rest is the eos-separated stream.
        assert block == [tokenizer.bos_token_id] + stream[i * 8 + 1 : (i + 1) * 8]


def test_pt_stage_saves_no_chat_template_where_the_base_had_none(gemma3_dense_dir, upcycled_llama_dir):
    """Without `template`, LLaMA-Factory writes its placeholder chat template into the tokenizer that the stage
    saves; for a tokenizer that adds bos (Gemma 3) its own parser then fails on it when the next stage starts."""
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    data_args = DataArguments()
    assert data_args.template is None
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dense_dir)
    assert tokenizer.chat_template is None
    workflow.get_template_and_fix_tokenizer(tokenizer, data_args)  # what the pt stage calls, with the plugin
    assert tokenizer.chat_template is None
    workflow.get_template_and_fix_tokenizer(tokenizer, data_args)  # the next stage starts

    # What the plugin prevents: LLaMA-Factory's own function, twice, as two stages without the plugin would call it.
    unpatched = AutoTokenizer.from_pretrained(gemma3_dense_dir)
    get_template_and_fix_tokenizer(unpatched, data_args)
    assert unpatched.chat_template is not None
    with pytest.raises(ValueError, match="placeholder is required"):
        get_template_and_fix_tokenizer(unpatched, data_args)

    # A tokenizer's own chat template is left alone.
    chat = AutoTokenizer.from_pretrained(upcycled_llama_dir)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    workflow.get_template_and_fix_tokenizer(chat, data_args)
    assert chat.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
