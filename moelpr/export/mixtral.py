"""Mixtral (``MixtralForCausalLM``): the export of LLaMA and Mistral models.

Mixtral has no dense layers, so a layer MoE-LPR left dense is written as N equal experts under a zero router,
which compute the dense FFN whatever the router says.
"""

from __future__ import annotations

from typing import Any

from .format import MoEFormat, head_dim


def _config(config: Any, num_experts: int, dense_layers: list[int]) -> dict[str, Any]:
    # A Mistral window is carried over only when no position falls outside it (see families._mistral_refusal).
    return {
        "num_local_experts": num_experts,
        "head_dim": head_dim(config),
        "sliding_window": getattr(config, "sliding_window", None),
    }


FORMAT = MoEFormat(
    name="mixtral",
    architecture="MixtralForCausalLM",
    model_type="mixtral",
    block="block_sparse_moe",
    router="gate",
    expert_tensors={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    qkv_bias=False,
    head_dim_from_hidden=False,
    dense_layers_as_mlp=False,
    moe_config=_config,
)
