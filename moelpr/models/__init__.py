"""MoE-LPR model families and their registration with transformers' Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .llama_moelpr import LlamaMoELPRConfig, LlamaMoELPRForCausalLM
from .modeling import MOE_BLOCK_CLASSES, MoELPRCausalLMOutputWithPast, MoELPRForCausalLMMixin
from .moe import MoELPRSparseBlock, routing_stats
from .moe_ct import MoECTBlock, fusion_stats
from .qwen2_moelpr import Qwen2MoELPRConfig, Qwen2MoELPRForCausalLM

# Dense model_type -> the MoE-LPR classes that upcycle it.
MOE_FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaMoELPRConfig, LlamaMoELPRForCausalLM),
    "qwen2": (Qwen2MoELPRConfig, Qwen2MoELPRForCausalLM),
}

for _config_class, _model_class in MOE_FAMILIES.values():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)

__all__ = [
    "MOE_BLOCK_CLASSES",
    "MOE_FAMILIES",
    "LlamaMoELPRConfig",
    "LlamaMoELPRForCausalLM",
    "MoECTBlock",
    "MoELPRCausalLMOutputWithPast",
    "MoELPRForCausalLMMixin",
    "MoELPRSparseBlock",
    "Qwen2MoELPRConfig",
    "Qwen2MoELPRForCausalLM",
    "fusion_stats",
    "routing_stats",
]
