"""The per-token language mask, from dataset_info.json through pt preprocessing to the batch.

A dataset's ``language`` is stamped on each of its rows while LLaMA-Factory aligns the dataset, so it
survives ``max_samples``, ``mix_strategy`` concat or interleave and caching. Pre-training preprocessing
then packs documents of different datasets into one block, so the row flag becomes a per-token
``lang_mask`` column built by the same tokenisation, concatenation and cutting as ``input_ids``.
Pre-training preprocessing also gets back the tokenizer's ``add_bos_token`` (see
:func:`moelpr.tokenization.restore_add_bos_token`), so blocks start with bos where the model expects one, and a
tokenizer without a chat template is saved without one, so that the next stage can read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling

from ..tokenization import restore_add_bos_token
from .setting_values import OLD

LANG_COLUMN = "_lang"  # row-level flag, 1 for an old-language document (removed by preprocessing)
LANG_MASK = "lang_mask"  # token-level flag, the model's ``lang_mask`` input


def wrap_dataset_attr_join(join: Callable[..., None]) -> Callable[..., None]:
    def join_with_language(self: Any, attr: dict[str, Any]) -> None:
        join(self, attr)
        self.language = attr.get("language")  # checked against the run's settings in hparams

    return join_with_language


@dataclass
class LanguageTagger:
    """A LLaMA-Factory dataset converter that also stamps the dataset's language on each row."""

    converter: Callable[[dict[str, Any]], dict[str, Any]]
    is_old: int

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        return {**self.converter(example), LANG_COLUMN: self.is_old}


def wrap_get_dataset_converter(get_converter: Callable[..., Any]) -> Callable[..., Any]:
    def get_dataset_converter(name: str, dataset_attr: Any, data_args: Any) -> Any:
        converter = get_converter(name, dataset_attr, data_args)
        # getattr: LLaMA-Factory's other entry points (web UI, evaluation) build plain DataArguments.
        if not getattr(data_args, "generate_lang_mask", False):
            return converter
        return LanguageTagger(converter, int(dataset_attr.language == OLD))

    return get_dataset_converter


class _LangMaskingTokenizer:
    """Tokenizer proxy whose encodings carry ``lang_mask`` next to ``input_ids``.

    LLaMA-Factory's pre-training processor concatenates and cuts every key the tokenizer returns in
    the same way (and truncates them alike without packing), so a mask returned here lines up with
    the tokens of each block, whichever documents it straddles.
    """

    def __init__(self, tokenizer: Any, is_old: list[int]) -> None:
        self._tokenizer = tokenizer
        self._is_old = is_old

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        encoded = self._tokenizer(texts, **kwargs)
        encoded[LANG_MASK] = [[flag] * len(ids) for flag, ids in zip(self._is_old, encoded["input_ids"], strict=True)]
        return encoded


def wrap_pretrain_preprocess(preprocess: Callable[..., dict[str, list[Any]]]) -> Callable[..., dict[str, list[Any]]]:
    def preprocess_dataset(self: Any, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        restore_add_bos_token(self.tokenizer)  # LLaMA-Factory starts each block with bos only if this is set
        if LANG_COLUMN not in examples:
            return preprocess(self, examples)
        tagging = replace(self, tokenizer=_LangMaskingTokenizer(self.tokenizer, examples[LANG_COLUMN]))
        return preprocess(tagging, examples)

    return preprocess_dataset


def wrap_get_template_and_fix_tokenizer(get_template: Callable[..., Any]) -> Callable[..., Any]:
    def get_template_and_fix_tokenizer(tokenizer: Any, data_args: Any) -> Any:
        had_chat_template = tokenizer.chat_template is not None
        template = get_template(tokenizer, data_args)
        if data_args.template is None and not had_chat_template:
            # LLaMA-Factory would write its placeholder ("empty") chat template into the tokenizer saved with the
            # stage's output, and the next stage, parsing it back, fails for every tokenizer that adds bos (Gemma
            # 3): the rendered template lacks the bos the parser cuts off. Pre-training keeps the base's "none".
            tokenizer.chat_template = None
        return template

    return get_template_and_fix_tokenizer


@dataclass
class LangMaskDataCollator(DataCollatorForLanguageModeling):
    """The pt collator, plus ``lang_mask`` padded like ``input_ids`` (padding counts as new-language)."""

    def torch_call(self, examples: list[Any]) -> dict[str, Any]:
        if not (isinstance(examples[0], Mapping) and LANG_MASK in examples[0]):
            return super().torch_call(examples)
        masks = [example[LANG_MASK] for example in examples]
        batch = super().torch_call([{k: v for k, v in ex.items() if k != LANG_MASK} for ex in examples])
        seq_len = batch["input_ids"].shape[1]
        left = self.tokenizer.padding_side == "left"
        batch[LANG_MASK] = torch.tensor(
            [[0] * (seq_len - len(m)) + list(m) if left else list(m) + [0] * (seq_len - len(m)) for m in masks],
            dtype=torch.long,
        )
        return batch


def lang_mask_collator_class(_collator_class: type) -> type:
    return LangMaskDataCollator
