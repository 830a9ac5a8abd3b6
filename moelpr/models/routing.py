"""Routing of every MoE block: the router's top-k choice, the two router losses of MoE-LPR, and how they reach the
router.

Losses are computed inside each MoE block and reach the router through :class:`_AttachLossGradient`
rather than through router logits collected after the forward pass: under reentrant gradient
checkpointing the first forward runs without autograd, so logits gathered there carry no graph,
and only what flows out of a checkpointed layer with its hidden states gets a gradient.

Each forward pass has its own :class:`RoutingContext`. It travels to the decoder layers as a keyword
argument (:data:`ROUTING_KWARG`), which gradient checkpointing stores with the layer call and passes
again when it recomputes the layer in backward; a pre-hook on every decoder layer takes it out of the
keyword arguments and makes it the calling thread's current context while the layer runs. So concurrent
forward passes (threads, ``nn.DataParallel``) never see each other's masks, and a recomputation sees
the masks of the pass it recomputes, in whichever thread autograd runs it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Keyword argument carrying the RoutingContext from the causal LM's forward to its decoder layers.
ROUTING_KWARG = "moe_routing_context"


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
    balance_loss: torch.Tensor | None = None
    lpr_loss: torch.Tensor | None = None  # None where the block has no LPR loss (MoE-CT)
    ffn_weight: torch.Tensor | None = None  # [tokens] float32, MoE-CT's fusion weight on the frozen FFN


@dataclass
class RoutingContext:
    """Inputs every MoE block of one forward pass needs, and the records the blocks leave."""

    token_mask: torch.Tensor | None  # [tokens] bool, False on padding
    lang_mask: torch.Tensor | None  # [tokens] bool, True on old-language tokens
    compute_losses: bool = False
    # (balance, lpr) per layer, numbers or 0-dim tensors; None: no loss gradient
    loss_weights: tuple[float | torch.Tensor, float | torch.Tensor] | None = None
    lpr_loss_form: str = "paper"  # the config's lpr_loss_form (see lpr_loss)
    loss_scale: LossScale | None = None
    records: list[LayerRouting] = field(default_factory=list)


_current = threading.local()


def current_routing_context() -> RoutingContext | None:
    """The context of the decoder layer running in this thread (``None`` when nothing was asked for)."""
    return getattr(_current, "context", None)


def enter_decoder_layer(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook (with kwargs) of every decoder layer: the layer's context becomes the thread's."""
    _current.context = kwargs.pop(ROUTING_KWARG, None)
    return args, kwargs


def exit_decoder_layer(module: nn.Module, args: tuple, output: Any) -> None:
    _current.context = None


def load_balancing_loss(
    router_probs: torch.Tensor, selected_experts: torch.Tensor, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch-Transformer balance loss at the scale of Mixtral's ``load_balancing_loss_func`` (the authors'):
    ``N * sum_i f_i * P_i`` over non-padding tokens, where ``f_i`` is the number of top-k slots expert ``i``
    takes per token (summed over the k choices) and ``P_i`` its mean router probability. It equals k for even
    routing and for a router whose weights are all zero. Masked sums, not boolean indexing, so that it never
    waits for the device."""
    num_tokens, num_experts = router_probs.shape
    slots = F.one_hot(selected_experts, num_experts).to(router_probs.dtype).sum(dim=1)  # [T, N]
    weight = token_mask.to(router_probs.dtype) if token_mask is not None else router_probs.new_ones(num_tokens)
    count = weight.sum().clamp(min=1.0)
    slots_per_token = (slots * weight[:, None]).sum(dim=0) / count
    mean_prob = (router_probs * weight[:, None]).sum(dim=0) / count
    return num_experts * torch.sum(slots_per_token * mean_prob)


def lpr_loss(router_logits: torch.Tensor, old_token_mask: torch.Tensor | None, form: str = "paper") -> torch.Tensor:
    """Language Priors Routing: cross-entropy of old-language tokens' routing toward expert 0, averaged over the
    old-language tokens; zero when there is none, so new-language-only batches get no LPR term.

    ``form="paper"``: on the router logits (one softmax), the paper's formula. ``form="authors"``: on the router's
    softmax outputs, as the authors' code does (``CrossEntropyLoss`` given the probabilities): a second softmax,
    whose inputs lie in [0, 1], so the loss is at least ``log(1 + (N - 1) / e)`` and its gradient reaching the
    logits is several times weaker (docs/llamafactory.md has the measured ratio). The authors average over every
    (layer, old-language token) pair and mask padding; the model averages this per-layer mean over layers, which
    is the same mean since every layer sees the same tokens.
    """
    logits = router_logits.float()
    if old_token_mask is None:
        return logits.sum() * 0.0
    if form == "authors":
        logits = F.softmax(logits, dim=-1)
    elif form != "paper":
        raise ValueError(f"lpr_loss form must be 'paper' or 'authors', got {form!r}.")
    weight = old_token_mask.to(logits.dtype)
    nll = -F.log_softmax(logits, dim=-1)[:, 0]
    return (nll * weight).sum() / weight.sum().clamp(min=1.0)


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax, top-k, renormalise: ``(router_probs [T, N] float32, weights [T, k], selected [T, k])``.

    With k = 1 renormalising gives a weight of exactly 1 and no gradient, so the LM loss could not teach
    the router. The weight is then ``p / stop_gradient(p)``: its value is 1, so an upcycled model still
    computes the dense function, and its gradient is ``grad p / p`` (the gradient of ``log p``): N times
    ``grad p`` at even routing (p = 1/N), and larger the less likely the chosen expert. Switch Transformer and
    the authors' code use the raw ``p`` as the weight (gradient ``grad p``, but every output scaled by p, about
    1/N at the start), so at the start the LM loss reaches the router about N times more strongly here.
    """
    router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, selected = torch.topk(router_probs, top_k, dim=-1)
    if top_k == 1:
        weights = weights / weights.detach()
    else:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return router_probs, weights, selected


def record_routing(
    output: torch.Tensor,
    router_logits: torch.Tensor,
    router_probs: torch.Tensor,
    selected: torch.Tensor,
    with_lpr: bool = True,
    ffn_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Leave the block's routing in the current context and, when training, attach the gradient of its
    weighted router losses to ``output``. ``with_lpr``: the block's expert 0 is the original FFN, so the LPR
    loss applies; ``ffn_weight``: a per-token weight of the original FFN to record (MoE-CT's fusion). Without
    a context (no labels, no router logits asked for) this does nothing at all."""
    context = current_routing_context()
    if context is None:
        return output
    if ffn_weight is not None:
        ffn_weight = ffn_weight.detach().float()
    if not context.compute_losses:
        context.records.append(LayerRouting(router_logits, ffn_weight=ffn_weight))
        return output
    balance = load_balancing_loss(router_probs, selected, context.token_mask)
    lpr = None
    if with_lpr:
        old_tokens = context.lang_mask
        if old_tokens is not None and context.token_mask is not None:
            old_tokens = old_tokens & context.token_mask
        lpr = lpr_loss(router_logits, old_tokens, context.lpr_loss_form)
    context.records.append(
        LayerRouting(router_logits, balance.detach(), lpr.detach() if lpr is not None else None, ffn_weight)
    )
    if context.loss_weights is not None and torch.is_grad_enabled():
        balance_weight, lpr_weight = context.loss_weights
        weighted = balance_weight * balance + (lpr_weight * lpr if lpr is not None else 0.0)
        if weighted.requires_grad:
            output = _AttachLossGradient.apply(output, weighted, context.loss_scale)
    return output


def probe_loss_scale(loss: torch.Tensor, scale: LossScale) -> torch.Tensor:
    """A zero to add to the returned loss; its backward records the gradient reaching the loss."""
    return _ProbeLossScale.apply(loss, scale)
