"""moelpr: MoE-LPR (and its LLaMA-Factory plugin) for teaching an LLM new languages without forgetting.

Importing the package registers the ``*_moelpr`` model types (``llama_moelpr``, ``qwen2_moelpr``,
``qwen3_moelpr``, ``mistral_moelpr``, ``gemma3_text_moelpr``) with transformers' Auto classes.
"""

from .models import (
    Gemma3TextMoELPRConfig,
    Gemma3TextMoELPRForCausalLM,
    LlamaMoELPRConfig,
    LlamaMoELPRForCausalLM,
    MistralMoELPRConfig,
    MistralMoELPRForCausalLM,
    MoELPRCausalLMOutputWithPast,
    Qwen2MoELPRConfig,
    Qwen2MoELPRForCausalLM,
    Qwen3MoELPRConfig,
    Qwen3MoELPRForCausalLM,
    routing_stats,
)

__version__ = "0.1.0"

__all__ = [
    "Gemma3TextMoELPRConfig",
    "Gemma3TextMoELPRForCausalLM",
    "LlamaMoELPRConfig",
    "LlamaMoELPRForCausalLM",
    "MistralMoELPRConfig",
    "MistralMoELPRForCausalLM",
    "MoELPRCausalLMOutputWithPast",
    "Qwen2MoELPRConfig",
    "Qwen2MoELPRForCausalLM",
    "Qwen3MoELPRConfig",
    "Qwen3MoELPRForCausalLM",
    "routing_stats",
]
