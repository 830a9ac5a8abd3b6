"""Config of ``qwen2_moelpr``: a Qwen2-family model (Qwen1.5, Qwen2) with upcycled MoE-LPR FFNs."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config

from ..configuration import MoELPRConfigMixin, dense_only_tp_plan


@strict
class Qwen2MoELPRConfig(MoELPRConfigMixin, Qwen2Config):
    model_type = "qwen2_moelpr"
    base_model_tp_plan = dense_only_tp_plan(Qwen2Config)


__all__ = ["Qwen2MoELPRConfig"]
