"""Config of ``llama_moelpr``: a LLaMA-family model (LLaMA 2/3, SmolLM2) with upcycled MoE-LPR FFNs."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from ..configuration import MoELPRConfigMixin, dense_only_tp_plan


@strict
class LlamaMoELPRConfig(MoELPRConfigMixin, LlamaConfig):
    model_type = "llama_moelpr"
    base_model_tp_plan = dense_only_tp_plan(LlamaConfig)


__all__ = ["LlamaMoELPRConfig"]
