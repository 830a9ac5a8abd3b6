from .configuration_mistral_moelpr import MistralMoELPRConfig
from .modeling_mistral_moelpr import MistralMoELPRForCausalLM

__all__ = ["MistralMoELPRConfig", "MistralMoELPRForCausalLM"]
