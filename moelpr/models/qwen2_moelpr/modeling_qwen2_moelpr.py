"""``qwen2_moelpr``: Qwen2-family causal LM whose chosen FFNs are upcycled MoE-LPR blocks."""

from __future__ import annotations

from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from ..modeling import MoELPRForCausalLMMixin
from .configuration_qwen2_moelpr import Qwen2MoELPRConfig


class Qwen2MoELPRForCausalLM(MoELPRForCausalLMMixin, Qwen2ForCausalLM):
    config_class = Qwen2MoELPRConfig
    config: Qwen2MoELPRConfig
    expert_class = Qwen2MLP


__all__ = ["Qwen2MoELPRForCausalLM"]
