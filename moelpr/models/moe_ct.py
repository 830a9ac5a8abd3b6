"""MoE-CT (arXiv 2407.00875): the frozen FFN stays whole and always active; beside it, an MoE of trainable
experts, and a learned fusion layer mixing the two per token.

The authors build it on DeepSpeed-MoE's residual MoE: ``c = softmax(W_c h)`` over two outputs and
``out = c[0] * moe(h) + c[1] * ffn(h)``. Here the routed experts start as copies of the FFN, so the
upcycled block computes ``(c[0] + c[1]) * ffn(h) = ffn(h)`` whatever the fusion and the router say: the
upcycled model computes the dense function. The router, its load-balancing loss and the expert dispatch are
MoE-LPR's (``moe.py``); only the LPR loss has no meaning here (the original FFN is not a routed expert).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .moe import ROUTER_NAME, RoutedExpertsBlock, as_floats, record_routing, upcycled_expert_tensors

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


def fusion_stat_tensors(
    ffn_weights: Sequence[torch.Tensor], token_mask: torch.Tensor | None = None, lang_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``fusion_stats`` as 0-dim tensors on the weights' device, without a host sync (see ``routing_stat_tensors``):
    a group this batch has no token of is NaN."""
    if not ffn_weights:
        return {}
    device = ffn_weights[0].device
    valid = token_mask.reshape(-1).to(device, torch.float32) if token_mask is not None else None
    groups = {"ffn_fusion_weight": valid}
    if lang_mask is not None:
        old = lang_mask.reshape(-1).to(device, torch.float32)
        everything = valid if valid is not None else torch.ones_like(old)
        groups["old_lang_ffn_fusion_weight"] = old * everything
        groups["new_lang_ffn_fusion_weight"] = (1.0 - old) * everything
    weights = [w.detach().float() for w in ffn_weights]
    stats = {}
    for key, mask in groups.items():
        counted = mask.sum() if mask is not None else None
        means = [w.mean() if mask is None else (w * mask).sum() / counted for w in weights]  # 0/0 = NaN
        stats[key] = torch.stack(means).mean()
    return stats


def fusion_stats(
    ffn_weights: Sequence[torch.Tensor], token_mask: torch.Tensor | None = None, lang_mask: torch.Tensor | None = None
) -> dict[str, float]:
    """MoE-CT's fusion summary averaged over MoE layers, for training logs: ``ffn_fusion_weight``, the mean weight
    on the frozen FFN over non-padding tokens, and with a language mask ``old_lang_ffn_fusion_weight`` /
    ``new_lang_ffn_fusion_weight`` over old- / new-language tokens (each absent when the batch has none)."""
    return as_floats(fusion_stat_tensors(ffn_weights, token_mask, lang_mask))


__all__ = ["FUSION_NAME", "MoECTBlock", "fusion_stat_tensors", "fusion_stats"]
