"""``llama_moelpr``: LLaMA-family causal LM whose chosen FFNs are upcycled MoE-LPR blocks."""

from __future__ import annotations

from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from ..modeling import MoELPRForCausalLMMixin
from .configuration_llama_moelpr import LlamaMoELPRConfig


class LlamaMoELPRForCausalLM(MoELPRForCausalLMMixin, LlamaForCausalLM):
    config_class = LlamaMoELPRConfig
    config: LlamaMoELPRConfig
    expert_class = LlamaMLP


__all__ = ["LlamaMoELPRForCausalLM"]
