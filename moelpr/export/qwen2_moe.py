"""Qwen2-MoE (``Qwen2MoeForCausalLM``, the Qwen1.5-MoE checkpoints): the export of Qwen2 models, and of LLaMA and
Mistral ones with ``--format qwen2_moe``.

Its attention has q/k/v biases (written as zeros for a family without them), and every MoE layer has a gated
shared expert, written with all-zero weights so that it adds exactly nothing.
"""

from __future__ import annotations

from typing import Any

from .format import FFN_TENSORS, MoEFormat

# Size of the all-zero shared expert. 256 is the smallest size that every engine takes: a multiple of llama.cpp's
# largest quantisation block (QK_K = 256, along the rows of down_proj) and of any tensor-parallel degree.
ZERO_SHARED_EXPERT_SIZE = 256


def _config(config: Any, num_experts: int, dense_layers: list[int]) -> dict[str, Any]:
    return {
        "num_experts": num_experts,
        "moe_intermediate_size": config.intermediate_size,
        "shared_expert_intermediate_size": ZERO_SHARED_EXPERT_SIZE,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layers,
        "qkv_bias": True,
        "use_sliding_window": False,
        "max_window_layers": config.num_hidden_layers,
    }


FORMAT = MoEFormat(
    name="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    model_type="qwen2_moe",
    block="mlp",
    router="gate",
    expert_tensors={name: name for name in FFN_TENSORS},
    qkv_bias=True,
    head_dim_from_hidden=True,
    dense_layers_as_mlp=True,
    moe_config=_config,
    zero_shared_expert_size=ZERO_SHARED_EXPERT_SIZE,
)
