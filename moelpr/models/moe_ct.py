"""MoE-CT (arXiv 2407.00875): the frozen FFN stays whole and always active; beside it, an MoE of trainable
experts, and a learned fusion layer mixing the two per token.

The authors build it on DeepSpeed-MoE's residual MoE: ``c = softmax(W_c h)`` over two outputs and
``out = c[0] * moe(h) + c[1] * ffn(h)``. Here the routed experts start as copies of the FFN, so the
upcycled block computes ``(c[0] + c[1]) * ffn(h) = ffn(h)`` whatever the fusion and the router say: the
upcycled model computes the dense function. The router, its load-balancing loss and the expert dispatch are
MoE-LPR's (``moe.py``); only the LPR loss has no meaning here (the original FFN is not a routed expert).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .moe import ROUTER_NAME, RoutedExpertsBlock, upcycled_expert_tensors
from .routing import record_routing

# Parameter-name part of the fusion layer ``W_c`` (trainable in MoE-CT).
FUSION_NAME = "fusion"


class MoECTBlock(RoutedExpertsBlock):
    """The frozen FFN (``original_expert``, the always-active shared expert), ``num_experts`` routed experts
    (``new_experts``) behind a bias-free top-k router, and the fusion layer ``fusion`` (``W_c``: hidden -> 2,
    with a bias as in DeepSpeed's residual MoE) whose softmax weighs the routed output (index 0) against the
    frozen FFN's (index 1). ``experts_implementation``: how the routed experts run
    (``configuration.EXPERTS_IMPLEMENTATIONS``)."""

    routes_original_expert = False

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        make_expert: Callable[[], nn.Module],
        experts_implementation: str = "auto",
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, make_expert, experts_implementation)
        self.fusion = nn.Linear(hidden_size, 2, bias=True)

    @staticmethod
    def upcycled_tensors(
        ffn: dict[str, torch.Tensor], num_experts: int, random_rows: Callable[[int], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The block's tensors (names relative to the block) upcycled from a dense FFN's: the FFN itself, ``num_experts``
        copies of it as routed experts, the router's ``[num_experts, hidden]`` weights from ``random_rows``, and a
        zero fusion layer, so every token starts with equal weight on the routed experts and the frozen FFN."""
        tensors = upcycled_expert_tensors(ffn, num_experts + 1)  # the FFN plus num_experts copies
        router = random_rows(num_experts)
        tensors[f"{ROUTER_NAME}.weight"] = router
        tensors[f"{FUSION_NAME}.weight"] = router.new_zeros(2, router.shape[1])
        tensors[f"{FUSION_NAME}.bias"] = router.new_zeros(2)
        return tensors

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden_size = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden_size)
        routed, router_logits, router_probs, selected = self.route_tokens(tokens)
        # In float32: the two weights then sum to 1 closely enough that copies of the FFN give back its output.
        fusion = F.softmax(self.fusion(tokens), dim=-1, dtype=torch.float32)
        mixed = fusion[:, :1] * routed.float() + fusion[:, 1:] * self.original_expert(tokens).float()
        output = mixed.to(hidden_states.dtype).reshape(batch, seq_len, hidden_size)
        return record_routing(output, router_logits, router_probs, selected, with_lpr=False, ffn_weight=fusion[:, 1])


__all__ = ["FUSION_NAME", "MoECTBlock"]
