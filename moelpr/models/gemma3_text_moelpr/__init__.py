from .configuration_gemma3_text_moelpr import Gemma3TextMoELPRConfig
from .modeling_gemma3_text_moelpr import Gemma3TextMoELPRForCausalLM

__all__ = ["Gemma3TextMoELPRConfig", "Gemma3TextMoELPRForCausalLM"]
