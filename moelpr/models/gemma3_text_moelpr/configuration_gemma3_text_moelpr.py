"""Config of ``gemma3_text_moelpr``: Gemma 3's text model (Gemma 3 270M and 1B; the text part of 4B-27B) with
upcycled MoE-LPR FFNs."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Gemma3TextConfig

from ..configuration import MoELPRConfigMixin, dense_only_tp_plan


@strict
class Gemma3TextMoELPRConfig(MoELPRConfigMixin, Gemma3TextConfig):
    model_type = "gemma3_text_moelpr"
    base_model_tp_plan = dense_only_tp_plan(Gemma3TextConfig)


__all__ = ["Gemma3TextMoELPRConfig"]
