"""The one interface of the transformers export formats: what a standard MoE architecture declares about itself.

Each output architecture is one module (:mod:`.mixtral`, :mod:`.qwen2_moe`, :mod:`.qwen3_moe`) holding a
:class:`MoEFormat`; the planning, renaming and writing they share (:mod:`.transformers_moe`) read nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MoELPRUserError

FFN_TENSORS = ("gate_proj", "up_proj", "down_proj")


class ExportError(MoELPRUserError, ValueError):
    """A checkpoint or request that cannot be exported exactly; printed as one line."""


@dataclass(frozen=True)
class MoEFormat:
    """A standard MoE architecture and where an MoE-LPR layer's tensors go in it."""

    name: str
    architecture: str
    model_type: str
    block: str  # module of a decoder layer that holds the router and the experts
    router: str  # the router's name inside ``block``
    expert_tensors: dict[str, str]  # FFN tensor -> its name inside one expert
    qkv_bias: bool  # its attention has q/k/v biases (written as zeros for a family without them)
    head_dim_from_hidden: bool  # engines take the head size to be hidden_size / num_attention_heads
    dense_layers_as_mlp: bool  # True: dense layers stay plain MLPs; False: N equal experts under a zero router
    moe_config: Callable[[Any, int, list[int]], dict[str, Any]]  # (source config, experts, dense layers) -> fields
    # Every MoE layer has a gated shared expert of this size, written with all-zero weights (None: it has none).
    zero_shared_expert_size: int | None = None
    # config.json keys transformers 5 writes under another name than the public checkpoints (and engines built on
    # transformers 4) read: transformers' name -> the public one.
    public_config_keys: dict[str, str] = field(default_factory=dict)

    def config_class(self) -> type:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[self.model_type]


def head_dim(config: Any) -> int:
    """The attention head size of a source config (transformers' default where the config leaves it out)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
