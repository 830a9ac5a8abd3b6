"""``qwen3_moelpr``: Qwen3-family causal LM whose chosen FFNs are upcycled MoE-LPR blocks."""

from __future__ import annotations

from transformers import Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

from ..modeling import MoELPRForCausalLMMixin
from .configuration_qwen3_moelpr import Qwen3MoELPRConfig


class Qwen3MoELPRForCausalLM(MoELPRForCausalLMMixin, Qwen3ForCausalLM):
    config_class = Qwen3MoELPRConfig
    config: Qwen3MoELPRConfig
    expert_class = Qwen3MLP


__all__ = ["Qwen3MoELPRForCausalLM"]
