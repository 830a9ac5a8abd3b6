"""MoE-LPR model families and their registration with transformers' Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .gemma3_text_moelpr import Gemma3TextMoELPRConfig, Gemma3TextMoELPRForCausalLM
from .llama_moelpr import LlamaMoELPRConfig, LlamaMoELPRForCausalLM
from .mistral_moelpr import MistralMoELPRConfig, MistralMoELPRForCausalLM
from .modeling import MOE_BLOCK_CLASSES, MoELPRCausalLMOutputWithPast, MoELPRForCausalLMMixin
from .moe import MoELPRSparseBlock
from .moe_ct import MoECTBlock
from .qwen2_moelpr import Qwen2MoELPRConfig, Qwen2MoELPRForCausalLM
from .qwen3_moelpr import Qwen3MoELPRConfig, Qwen3MoELPRForCausalLM
from .statistics import fusion_stat_tensors, fusion_stats, routing_stat_tensors, routing_stats

# Dense model_type -> the MoE-LPR classes that upcycle it (docs/adding_a_family.md says how to add one).
MOE_FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaMoELPRConfig, LlamaMoELPRForCausalLM),
    "qwen2": (Qwen2MoELPRConfig, Qwen2MoELPRForCausalLM),
    "qwen3": (Qwen3MoELPRConfig, Qwen3MoELPRForCausalLM),
    "mistral": (MistralMoELPRConfig, MistralMoELPRForCausalLM),
    "gemma3_text": (Gemma3TextMoELPRConfig, Gemma3TextMoELPRForCausalLM),
}

for _config_class, _model_class in MOE_FAMILIES.values():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)

__all__ = [
    "MOE_BLOCK_CLASSES",
    "MOE_FAMILIES",
    "Gemma3TextMoELPRConfig",
    "Gemma3TextMoELPRForCausalLM",
    "LlamaMoELPRConfig",
    "LlamaMoELPRForCausalLM",
    "MistralMoELPRConfig",
    "MistralMoELPRForCausalLM",
    "MoECTBlock",
    "MoELPRCausalLMOutputWithPast",
    "MoELPRForCausalLMMixin",
    "MoELPRSparseBlock",
    "Qwen2MoELPRConfig",
    "Qwen2MoELPRForCausalLM",
    "Qwen3MoELPRConfig",
    "Qwen3MoELPRForCausalLM",
    "fusion_stat_tensors",
    "fusion_stats",
    "routing_stat_tensors",
    "routing_stats",
]
