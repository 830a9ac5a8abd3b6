from .configuration_qwen3_moelpr import Qwen3MoELPRConfig
from .modeling_qwen3_moelpr import Qwen3MoELPRForCausalLM

__all__ = ["Qwen3MoELPRConfig", "Qwen3MoELPRForCausalLM"]
