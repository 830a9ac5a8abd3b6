"""Config of ``qwen3_moelpr``: a Qwen3 dense model (Qwen3 0.6B-32B) with upcycled MoE-LPR FFNs."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config

from ..configuration import MoELPRConfigMixin, dense_only_tp_plan


@strict
class Qwen3MoELPRConfig(MoELPRConfigMixin, Qwen3Config):
    model_type = "qwen3_moelpr"
    base_model_tp_plan = dense_only_tp_plan(Qwen3Config)


__all__ = ["Qwen3MoELPRConfig"]
