from .configuration_llama_moelpr import LlamaMoELPRConfig
from .modeling_llama_moelpr import LlamaMoELPRForCausalLM

__all__ = ["LlamaMoELPRConfig", "LlamaMoELPRForCausalLM"]
