"""MoE-CT (arXiv 2407.00875): the frozen FFN stays whole and always active; beside it, an MoE of trainable
experts, and a learned fusion layer mixing the two per token.

The authors build it on DeepSpeed-MoE's residual MoE: ``c = softmax(W_c h)`` over two outputs and
``out = c[0] * moe(h) + c[1] * ffn(h)``. Here the routed experts start as copies of the FFN, so the
upcycled block computes ``(c[0] + c[1]) * ffn(h) = ffn(h)`` whatever the fusion and the router say: the
upcycled model computes the dense function. The router, its load-balancing loss and the expert dispatch are
MoE-LPR's (``RoutedExpertsBlock`` in ``moe.py``); only the LPR loss has no meaning here (the original FFN is not a
routed expert).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import MoELPRConfigMixin
from .moe import ROUTER_NAME, RoutedExpertsBlock

# Parameter-name part of the fusion layer ``W_c`` (trainable in MoE-CT).
FUSION_NAME = "fusion"


class MoECTBlock(RoutedExpertsBlock):
    """The frozen FFN (``original_expert``, the always-active shared expert), ``num_experts`` routed experts
    (``new_experts``) behind a bias-free top-k router, and the fusion layer ``fusion`` (``W_c``: hidden -> 2,
    with a bias as in DeepSpeed's residual MoE) whose softmax weighs the routed output (index 0) against the
    frozen FFN's (index 1)."""

    routes_original_expert = False

    def __init__(self, config: MoELPRConfigMixin, num_experts: int, make_expert: Callable[[], nn.Module]) -> None:
        super().__init__(config, num_experts, make_expert)
        self.fusion = nn.Linear(config.hidden_size, 2, bias=True)

    @classmethod
    def upcycled_tensors(
        cls, ffn: dict[str, torch.Tensor], num_experts: int, random_rows: Callable[[int], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The routed experts' and the router's tensors (``RoutedExpertsBlock.upcycled_tensors``: ``num_experts``
        copies of the FFN) and a zero fusion layer, so every token starts with equal weight on the routed experts
        and the frozen FFN."""
        tensors = super().upcycled_tensors(ffn, num_experts, random_rows)
        router = tensors[f"{ROUTER_NAME}.weight"]
        tensors[f"{FUSION_NAME}.weight"] = router.new_zeros(2, router.shape[1])
        tensors[f"{FUSION_NAME}.bias"] = router.new_zeros(2)
        return tensors

    def combine(self, tokens: torch.Tensor, routed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # In float32: the two weights then sum to 1 closely enough that copies of the FFN give back its output.
        fusion = F.softmax(self.fusion(tokens), dim=-1, dtype=torch.float32)
        mixed = fusion[:, :1] * routed.float() + fusion[:, 1:] * self.original_expert(tokens).float()
        return mixed.to(tokens.dtype), fusion[:, 1]


__all__ = ["FUSION_NAME", "MoECTBlock"]
