"""``mistral_moelpr``: Mistral-family causal LM whose chosen FFNs are upcycled MoE-LPR blocks."""

from __future__ import annotations

from transformers import MistralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralMLP

from ..modeling import MoELPRForCausalLMMixin
from .configuration_mistral_moelpr import MistralMoELPRConfig


class MistralMoELPRForCausalLM(MoELPRForCausalLMMixin, MistralForCausalLM):
    config_class = MistralMoELPRConfig
    config: MistralMoELPRConfig
    expert_class = MistralMLP


__all__ = ["MistralMoELPRForCausalLM"]
