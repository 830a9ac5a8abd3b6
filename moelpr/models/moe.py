"""The upcycled MoE block shared by every model family: the original FFN, its new copies and the router.

How the block routes and what it records: ``routing.py``; how the experts run: ``expert_dispatch.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .expert_dispatch import run_experts
from .routing import record_routing, route

# Parameter-name parts the freeze rules of the two training stages match on.
ROUTER_NAME = "router"
ORIGINAL_EXPERT_NAME = "original_expert"
NEW_EXPERTS_NAME = "new_experts"


def upcycled_expert_tensors(ffn: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Block-relative names -> tensors of the experts upcycled from one dense FFN (``ffn``: its tensors by
    name inside the FFN): expert 0 is the FFN itself, the new experts are independent copies."""
    tensors = {f"{ORIGINAL_EXPERT_NAME}.{name}": tensor for name, tensor in ffn.items()}
    for j in range(num_experts - 1):
        tensors.update({f"{NEW_EXPERTS_NAME}.{j}.{name}": tensor.clone() for name, tensor in ffn.items()})
    return tensors


class RoutedExpertsBlock(nn.Module):
    """What both methods' blocks hold: the original FFN (``original_expert``, its own name, so it can be frozen by
    name), new experts (``new_experts``, started as its copies) and a bias-free linear router over the
    ``num_experts`` routed experts (``routed_experts``) that picks the top-k per token. A subclass says whether the
    original FFN is one of the routed experts (``routes_original_expert``: MoE-LPR's expert 0) or stays outside
    the router (MoE-CT's shared expert); the number of new experts follows from it.
    ``experts_implementation``: how the experts run (``configuration.EXPERTS_IMPLEMENTATIONS``)."""

    routes_original_expert: bool

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        make_expert: Callable[[], nn.Module],
        experts_implementation: str = "auto",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.experts_implementation = experts_implementation
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.original_expert = make_expert()
        num_new = num_experts - 1 if self.routes_original_expert else num_experts
        self.new_experts = nn.ModuleList(make_expert() for _ in range(num_new))

    def routed_experts(self) -> list[nn.Module]:
        return [self.original_expert, *self.new_experts] if self.routes_original_expert else list(self.new_experts)

    def route_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed experts' weighted output for ``tokens`` ``[n, hidden]``, with the router's logits, its
        probabilities and the selected experts (what ``record_routing`` keeps)."""
        router_logits = self.router(tokens)
        router_probs, weights, selected = route(router_logits, self.top_k)
        output = run_experts(
            tokens,
            self.routed_experts(),
            weights,
            selected,
            run_idle=self.training,
            implementation=self.experts_implementation,
        )
        return output, router_logits, router_probs, selected


class MoELPRSparseBlock(RoutedExpertsBlock):
    """Upcycled FFN: the router picks among all ``num_experts``, expert 0 being the original FFN and experts
    1..N-1 its copies."""

    routes_original_expert = True

    @staticmethod
    def upcycled_tensors(
        ffn: dict[str, torch.Tensor], num_experts: int, random_rows: Callable[[int], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The block's tensors (names relative to the block) upcycled from a dense FFN's; ``random_rows(n)`` gives
        the router's initial ``[n, hidden]`` weights. The block then computes what the FFN did, whatever the
        router says."""
        return {**upcycled_expert_tensors(ffn, num_experts), f"{ROUTER_NAME}.weight": random_rows(num_experts)}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden_size = hidden_states.shape
        output, router_logits, router_probs, selected = self.route_tokens(hidden_states.reshape(-1, hidden_size))
        return record_routing(output.reshape(batch, seq_len, hidden_size), router_logits, router_probs, selected)
