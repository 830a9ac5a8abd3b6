"""Config of ``mistral_moelpr``: a Mistral-family model (Mistral 7B, Mistral NeMo, Mistral Small) with upcycled MoE-LPR FFNs."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import MistralConfig

from ..configuration import MoELPRConfigMixin, dense_only_tp_plan


@strict
class MistralMoELPRConfig(MoELPRConfigMixin, MistralConfig):
    model_type = "mistral_moelpr"
    base_model_tp_plan = dense_only_tp_plan(MistralConfig)


__all__ = ["MistralMoELPRConfig"]
