"""The upcycled MoE block shared by every model family, and the two router losses of MoE-LPR.

Losses are computed inside each MoE block and reach the router through :class:`_AttachLossGradient`
rather than through router logits collected after the forward pass: under reentrant gradient
checkpointing the first forward runs without autograd, so logits gathered there carry no graph,
and only what flows out of a checkpointed layer with its hidden states gets a gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Parameter-name parts the freeze rules of the two training stages match on.
ROUTER_NAME = "router"
ORIGINAL_EXPERT_NAME = "original_expert"
NEW_EXPERTS_NAME = "new_experts"


class LossScale:
    """Carries the factor the trainer applied to the returned loss (gradient accumulation, fp16 loss
    scaling, DeepSpeed) from the loss node back to the in-block loss gradients, which are injected
    below the loss and would otherwise miss that factor."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class _ProbeLossScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: torch.Tensor, scale: LossScale) -> torch.Tensor:
        ctx.scale = scale
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Created last in the forward pass, this node runs before any layer's backward (autograd
        # visits ready nodes newest first), so the scale is known when the layers need it.
        ctx.scale.value = grad_output.detach()
        return None, None


class _AttachLossGradient(torch.autograd.Function):
    """Identity on the hidden states whose backward also sends ``scale`` into ``loss``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, scale: LossScale) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        grad_loss = None
        if ctx.needs_input_grad[1] and ctx.scale.value is not None:
            shape, dtype, device = ctx.loss_meta
            grad_loss = ctx.scale.value.to(dtype=dtype, device=device).expand(shape)
        return grad_hidden, grad_loss, None


@dataclass
class LayerRouting:
    """What one MoE layer reports for one forward pass."""

    router_logits: torch.Tensor  # [tokens, num_experts]
    balance_loss: torch.Tensor
    lpr_loss: torch.Tensor


@dataclass
class RoutingContext:
    """Per-forward inputs every MoE block needs and the records it leaves.

    It stays in place after the forward pass on purpose: reentrant checkpointing re-runs the blocks
    during backward and they must see the same masks then.
    """

    token_mask: torch.Tensor | None  # [tokens] bool, False on padding
    lang_mask: torch.Tensor | None  # [tokens] bool, True on old-language tokens
    loss_weights: tuple[float, float] | None = None  # (balance, lpr) per layer; None: no loss gradient
    loss_scale: LossScale | None = None
    records: list[LayerRouting] = field(default_factory=list)


class RoutingState:
    """One object shared by all MoE blocks of a model, so the model sets the context once per forward."""

    def __init__(self) -> None:
        self.context: RoutingContext | None = None


def load_balancing_loss(
    router_probs: torch.Tensor, selected_experts: torch.Tensor, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch-Transformer balance loss ``N * sum_i f_i * P_i`` over non-padding tokens.

    ``f_i`` is the share of top-k slots given to expert ``i`` and ``P_i`` its mean router probability;
    the loss is 1.0 for perfectly even routing and grows as routing concentrates.
    """
    num_experts = router_probs.shape[-1]
    slots = F.one_hot(selected_experts, num_experts).to(router_probs.dtype).sum(dim=1)  # [T, N]
    if token_mask is not None:
        router_probs = router_probs[token_mask]
        slots = slots[token_mask]
    if router_probs.shape[0] == 0:
        return router_probs.sum() * 0.0
    slot_share = slots.sum(dim=0) / slots.sum()
    mean_prob = router_probs.mean(dim=0)
    return num_experts * torch.sum(slot_share * mean_prob)


def lpr_loss(router_logits: torch.Tensor, old_token_mask: torch.Tensor | None) -> torch.Tensor:
    """Language Priors Routing: cross-entropy of old-language tokens' router logits toward expert 0.

    Applied to logits (one softmax), as in the paper's formula; zero when no old-language token is
    present, so new-language-only batches get no LPR term.
    """
    if old_token_mask is None or not bool(old_token_mask.any()):
        return router_logits.float().sum() * 0.0
    logits = router_logits[old_token_mask].float()
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


class MoELPRSparseBlock(nn.Module):
    """Upcycled FFN: expert 0 is the original FFN (its own name, so it can be frozen by name),
    experts 1..N-1 start as its copies; a bias-free linear router picks the top-k per token."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        make_expert: Callable[[], nn.Module],
        state: RoutingState,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.original_expert = make_expert()
        self.new_experts = nn.ModuleList(make_expert() for _ in range(num_experts - 1))
        # A plain attribute, not a submodule: it holds no weights and must not be saved.
        self._state = state

    def experts(self) -> list[nn.Module]:
        return [self.original_expert, *self.new_experts]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden_size = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden_size)
        router_logits = self.router(tokens)
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, selected = torch.topk(router_probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(tokens.dtype)

        output = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts()):
            # Every expert runs, on zero tokens if need be, so that under DDP each expert's
            # parameters take part in every step on every rank.
            token_idx, slot_idx = torch.where(selected == index)
            expert_out = expert(tokens[token_idx]) * weights[token_idx, slot_idx, None]
            output.index_add_(0, token_idx, expert_out)
        output = output.reshape(batch, seq_len, hidden_size)

        context = self._state.context
        if context is None:
            return output
        balance = load_balancing_loss(router_probs, selected, context.token_mask)
        old_tokens = context.lang_mask
        if old_tokens is not None and context.token_mask is not None:
            old_tokens = old_tokens & context.token_mask
        lpr = lpr_loss(router_logits, old_tokens)
        context.records.append(LayerRouting(router_logits, balance.detach(), lpr.detach()))
        if context.loss_weights is not None and torch.is_grad_enabled():
            balance_weight, lpr_weight = context.loss_weights
            weighted = balance_weight * balance + lpr_weight * lpr
            if weighted.requires_grad:
                output = _AttachLossGradient.apply(output, weighted, context.loss_scale)
        return output


def probe_loss_scale(loss: torch.Tensor, scale: LossScale) -> torch.Tensor:
    """A zero to add to the returned loss; its backward records the gradient reaching the loss."""
    return _ProbeLossScale.apply(loss, scale)


def routing_stats(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    token_mask: torch.Tensor | None = None,
    lang_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Routing summary averaged over MoE layers, for training logs.

    ``expert_share_{i}``: share of top-k routing slots taken by expert ``i`` (non-padding tokens).
    ``old_lang_expert0_top1_share``: share of old-language tokens whose top-1 expert is expert 0
    (absent when the batch has no old-language token).
    """
    if not router_logits:
        return {}
    num_experts = router_logits[0].shape[-1]
    flat_token = token_mask.reshape(-1).bool() if token_mask is not None else None
    flat_old = lang_mask.reshape(-1).bool() if lang_mask is not None else None
    if flat_old is not None and flat_token is not None:
        flat_old = flat_old & flat_token
    shares = torch.zeros(num_experts)
    expert0_shares = []
    for logits in router_logits:
        logits = logits.detach().float().cpu()
        selected = torch.topk(logits, top_k, dim=-1).indices
        counted = selected if flat_token is None else selected[flat_token.cpu()]
        shares += torch.bincount(counted.reshape(-1), minlength=num_experts).float() / max(counted.numel(), 1)
        if flat_old is not None and bool(flat_old.any()):
            expert0_shares.append((logits[flat_old.cpu()].argmax(dim=-1) == 0).float().mean().item())
    stats = {f"expert_share_{i}": (shares[i] / len(router_logits)).item() for i in range(num_experts)}
    if expert0_shares:
        stats["old_lang_expert0_top1_share"] = sum(expert0_shares) / len(expert0_shares)
    return stats
