"""Qwen3-MoE (``Qwen3MoeForCausalLM``): the export of Qwen3 models, whose q/k norms only it has."""

from __future__ import annotations

from typing import Any

from .format import FFN_TENSORS, MoEFormat


def _config(config: Any, num_experts: int, dense_layers: list[int]) -> dict[str, Any]:
    return {
        "num_experts": num_experts,
        "moe_intermediate_size": config.intermediate_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layers,
        "head_dim": config.head_dim,
        "attention_bias": False,
        "use_sliding_window": False,
    }


FORMAT = MoEFormat(
    name="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    block="mlp",
    router="gate",
    expert_tensors={name: name for name in FFN_TENSORS},
    qkv_bias=False,
    head_dim_from_hidden=False,
    dense_layers_as_mlp=True,
    moe_config=_config,
    public_config_keys={"num_local_experts": "num_experts"},
)
