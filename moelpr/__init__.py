"""moelpr: MoE-LPR (and its LLaMA-Factory plugin) for teaching an LLM new languages without forgetting.

Importing the package registers the ``llama_moelpr`` and ``qwen2_moelpr`` model types with
transformers' Auto classes.
"""

from .models import (
    LlamaMoELPRConfig,
    LlamaMoELPRForCausalLM,
    MoELPRCausalLMOutputWithPast,
    Qwen2MoELPRConfig,
    Qwen2MoELPRForCausalLM,
    routing_stats,
)

__version__ = "0.1.0"

__all__ = [
    "LlamaMoELPRConfig",
    "LlamaMoELPRForCausalLM",
    "MoELPRCausalLMOutputWithPast",
    "Qwen2MoELPRConfig",
    "Qwen2MoELPRForCausalLM",
    "routing_stats",
]
