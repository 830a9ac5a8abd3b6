from .configuration_qwen2_moelpr import Qwen2MoELPRConfig
from .modeling_qwen2_moelpr import Qwen2MoELPRForCausalLM

__all__ = ["Qwen2MoELPRConfig", "Qwen2MoELPRForCausalLM"]
