"""The upcycled MoE block shared by every model family: the original FFN, its new copies and the router.

How the block routes and what it records: ``routing.py``; how the experts run: ``expert_dispatch.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .configuration import MoELPRConfigMixin
from .expert_dispatch import run_experts
from .routing import record_routing, route

# Parameter-name parts the freeze rules of the two training stages match on.
ROUTER_NAME = "router"
ORIGINAL_EXPERT_NAME = "original_expert"
NEW_EXPERTS_NAME = "new_experts"


class RoutedExpertsBlock(nn.Module):
    """What both methods' blocks hold: the original FFN (``original_expert``, its own name, so it can be frozen by
    name), new experts (``new_experts``, started as its copies) and a bias-free linear router over the
    ``num_experts`` routed experts (``routed_experts``) that picks the top-k per token. A subclass says whether the
    original FFN is one of the routed experts (``routes_original_expert``: MoE-LPR's expert 0, which the LPR loss
    routes old-language tokens to) or stays outside the router (MoE-CT's shared expert); the number of new experts
    follows from it, and ``combine`` says how the routed experts' output becomes the block's.

    The block keeps the model's ``config`` and reads its settings (``num_experts_per_tok``,
    ``moe_experts_implementation``) at every call, so a change of ``model.config`` after the model is built takes
    effect at the next forward."""

    routes_original_expert: bool

    def __init__(self, config: MoELPRConfigMixin, num_experts: int, make_expert: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.original_expert = make_expert()
        self.new_experts = nn.ModuleList(make_expert() for _ in range(self.num_new_experts(num_experts)))

    @classmethod
    def num_new_experts(cls, num_experts: int) -> int:
        return num_experts - 1 if cls.routes_original_expert else num_experts

    @classmethod
    def upcycled_tensors(
        cls, ffn: dict[str, torch.Tensor], num_experts: int, random_rows: Callable[[int], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The block's tensors (names relative to the block) upcycled from a dense FFN's (``ffn``: its tensors by
        name inside the FFN): the FFN itself, independent copies of it as the new experts, and the router's initial
        ``[num_experts, hidden]`` weights from ``random_rows``."""
        tensors = {f"{ORIGINAL_EXPERT_NAME}.{name}": tensor for name, tensor in ffn.items()}
        for j in range(cls.num_new_experts(num_experts)):
            tensors.update({f"{NEW_EXPERTS_NAME}.{j}.{name}": tensor.clone() for name, tensor in ffn.items()})
        tensors[f"{ROUTER_NAME}.weight"] = random_rows(num_experts)
        return tensors

    def routed_experts(self) -> list[nn.Module]:
        return [self.original_expert, *self.new_experts] if self.routes_original_expert else list(self.new_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden_size = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden_size)
        router_logits = self.router(tokens)
        router_probs, weights, selected = route(router_logits, self.config.num_experts_per_tok)
        routed = run_experts(
            tokens,
            self.routed_experts(),
            weights,
            selected,
            run_idle=self.training,
            implementation=self.config.moe_experts_implementation,
        )
        output, ffn_weight = self.combine(tokens, routed)
        output = output.reshape(batch, seq_len, hidden_size)
        return record_routing(
            output, router_logits, router_probs, selected, with_lpr=self.routes_original_expert, ffn_weight=ffn_weight
        )

    def combine(self, tokens: torch.Tensor, routed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output for ``tokens`` ``[n, hidden]`` from the routed experts' weighted output ``routed``,
        and each token's weight on the original FFN where the block mixes it in (``None``: it is a routed expert)."""
        return routed, None


class MoELPRSparseBlock(RoutedExpertsBlock):
    """Upcycled FFN: the router picks among all ``num_experts``, expert 0 being the original FFN and experts
    1..N-1 its copies, so the upcycled block computes what the FFN did, whatever the router says."""

    routes_original_expert = True
