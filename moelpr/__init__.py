"""moelpr: MoE-LPR (and its LLaMA-Factory plugin) for teaching an LLM new languages without forgetting.

Importing the package registers the ``*_moelpr`` model types (``llama_moelpr``, ``qwen2_moelpr``,
``qwen3_moelpr``, ``mistral_moelpr``, ``gemma3_text_moelpr``) with transformers' Auto classes, and gives the
checkpoint layer (which knows no model family) the upcycler's layout of slim checkpoints made from a dense model.
"""

from .checkpoints.slim import register_dense_base_layout
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
from .upcycling.slim_base import dense_base_layout

# Here, at the top, so that no layer imports one above it: the models layer opens slim checkpoints, whose dense
# bases only the upcycling layer (above models) knows how to lay out.
register_dense_base_layout(dense_base_layout)

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
