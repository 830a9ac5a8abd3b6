"""Tiny random dense checkpoints with a locally trained tokenizer, so tests need no hub access."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A Mixture-of-Experts model routes every token to a few experts.",
    "Magyarul: a gyors barna róka átugorja a lusta kutyát.",
    "Türkçe: hızlı kahverengi tilki tembel köpeğin üzerinden atlar.",
    "Ελληνικά: η γρήγορη καφέ αλεπού πηδά πάνω από το τεμπέλικο σκυλί.",
]

FAMILIES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
    "gemma3_text": Gemma3TextConfig,
}

# What makes each tiny model exercise its family's own features on the tests' short batches: Qwen3's and Mistral
# NeMo's head size is not hidden / heads; Mistral attends within a window shorter than the test sentences; Gemma 3
# alternates windowed and global layers, scales attention by its own scalar and soft-caps the final logits.
FAMILY_FIELDS = {
    "qwen3": {"head_dim": 32},
    "mistral": {"head_dim": 32, "sliding_window": 4},
    "gemma3_text": {
        "head_dim": 32,
        "sliding_window": 4,
        "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 24,
        "final_logit_softcapping": 0.5,  # the random logits are about as large
    },
}


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")


def save_dense_model(
    path: Path,
    family: str = "llama",
    num_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    **config_fields,
) -> Path:
    """A random dense model of ``family`` and its tokenizer, saved at ``path``: tiny unless ``config_fields``
    (``hidden_size=2048``, ``vocab_size=32000``...) say otherwise; a larger vocabulary than the tokenizer's is
    allowed, its extra ids just never come out of the tokenizer."""
    tokenizer = build_tokenizer()
    fields = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        **FAMILY_FIELDS.get(family, {}),
        **config_fields,
    }
    config = FAMILIES[family](num_hidden_layers=num_layers, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    return path
