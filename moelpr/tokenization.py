"""Tokenizer settings that LLaMA-Factory and ``moelpr eval`` read but transformers 5 does not restore."""

from __future__ import annotations

from typing import Any


def restore_add_bos_token(tokenizer: Any) -> None:
    """Set ``add_bos_token`` on a tokenizer whose encodings start with its bos token.

    transformers 5.6 keeps "add bos" only in tokenizer.json's post-processor: ``from_pretrained`` drops a saved
    ``add_bos_token`` and the attribute reads False. LLaMA-Factory 0.9.5's pre-training preprocessing tokenizes
    without special tokens and reads that attribute to start each packed block with bos (``moelpr eval`` does
    the same), so Gemma 3 would train and be measured without its <bos>, which quadruples its perplexity on
    English.
    """
    bos = tokenizer.bos_token_id
    if bos is None or getattr(tokenizer, "add_bos_token", False):
        return
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special[:1] == [bos] and without[:1] != [bos]:
        tokenizer.add_bos_token = True
