"""The upcycled MoE block shared by every model family, and the two router losses of MoE-LPR.

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

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Parameter-name parts the freeze rules of the two training stages match on.
ROUTER_NAME = "router"
ORIGINAL_EXPERT_NAME = "original_expert"
NEW_EXPERTS_NAME = "new_experts"

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


def _autocast_on(device: torch.device) -> bool:
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def _compute_dtype(tokens: torch.Tensor) -> torch.dtype:
    """The dtype the experts' linear layers compute in: autocast's where it is on (as ``F.linear`` would)."""
    if _autocast_on(tokens.device):
        return torch.get_autocast_dtype(tokens.device.type)
    return tokens.dtype


def grouped_ffn_supported(experts: Sequence[nn.Module], tokens: torch.Tensor) -> bool:
    """Whether ``experts`` can run as one grouped GEMM on ``tokens``: gated FFNs (``down(act(gate(x)) * up(x))``,
    every family's MLP) of bias-free plain linear layers with the same activation, weights held whole on the
    tokens' device in their compute dtype (any float dtype under autocast, which casts them). Not with weights
    another framework manages (DeepSpeed ZeRO-3 partitions, PEFT-wrapped layers, DTensors): these run through
    the experts' own forward, which their hooks need."""
    first = experts[0]
    autocast = _autocast_on(tokens.device)
    for expert in experts:
        if type(expert) is not type(first) or type(getattr(expert, "act_fn", None)) is not type(first.act_fn):
            return False
        if expert.act_fn.extra_repr() != first.act_fn.extra_repr():
            return False
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(expert, name, None)
            if type(linear) is not nn.Linear or linear.bias is not None:
                return False
            weight = linear.weight
            if type(weight.data) is not torch.Tensor or hasattr(weight, "ds_id") or weight.device != tokens.device:
                return False
            if weight.shape != getattr(first, name).weight.shape:
                return False
            if not (weight.dtype == tokens.dtype or (autocast and weight.is_floating_point())):
                return False
    return True


def uses_grouped_experts(implementation: str, experts: Sequence[nn.Module], tokens: torch.Tensor) -> bool:
    """``"auto"``: grouped on CUDA in bf16 (what ``torch._grouped_mm`` supports there, SM 8.0 and newer); the loop
    otherwise, the CPU included, where whole training steps measured slower grouped than looped in bf16 and float32
    (stacking the weights costs more than the per-expert calls it saves; benchmarks/README.md).
    ``"grouped"`` is refused with a clear error where the experts cannot be grouped."""
    if implementation == "loop":
        return False
    if implementation == "grouped":
        if not grouped_ffn_supported(experts, tokens):
            raise ValueError(
                "moe_experts_implementation='grouped' needs bias-free gated FFN experts whose weights are plain "
                "tensors of the tokens' dtype (not ZeRO-3 partitions or PEFT layers); use 'auto' or 'loop'."
            )
        return True
    # The device and dtype first: they are cheap, and this runs for every layer at every decoded token.
    return (
        tokens.device.type == "cuda"
        and _compute_dtype(tokens) == torch.bfloat16
        and torch.cuda.get_device_capability(tokens.device) >= (8, 0)
        and grouped_ffn_supported(experts, tokens)
    )


class _GroupedLinear(torch.autograd.Function):
    """``x[group e] @ W_e.T`` for every group, ``W_e`` the concatenation (along output rows) of expert ``e``'s
    ``parts`` weights, in one grouped GEMM, in ``x``'s dtype (weights of another dtype are cast, as autocast
    casts them for ``F.linear``).

    The experts keep their own parameters (their names and freezing are per expert); the stacked weight is
    built in forward, not saved (autograd would otherwise keep a copy of every layer's experts until backward),
    and built again in backward. Each weight gets its own gradient, and none is computed when no weight
    needs one (router-only training)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offsets: torch.Tensor, parts: int, *weights: torch.Tensor) -> torch.Tensor:
        ctx.parts = parts
        ctx.save_for_backward(x, offsets, *weights)
        return torch._grouped_mm(x, _stack_weights(weights, parts, x.dtype).transpose(-2, -1), offs=offsets)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, offsets, *weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_output, _stack_weights(weights, ctx.parts, x.dtype), offs=offsets)
        grad_weights = [None] * len(weights)
        if any(ctx.needs_input_grad[3:]):
            # [out, tokens] @ [tokens, in] split by the same offsets: one [E, out, in] gradient per expert.
            grad_stacked = torch._grouped_mm(grad_output.t(), x, offs=offsets)
            rows = grad_stacked.reshape(-1, grad_stacked.shape[-1]).split([w.shape[0] for w in weights])
            grad_weights = [
                g.to(w.dtype) if needed else None for g, w, needed in zip(rows, weights, ctx.needs_input_grad[3:])
            ]
        return grad_x, None, None, *grad_weights


def _stack_weights(weights: Sequence[torch.Tensor], parts: int, dtype: torch.dtype) -> torch.Tensor:
    """``[E, sum of parts' rows, in]`` in ``dtype`` from weights listed expert by expert, ``parts`` per expert."""
    stacked = weights[0].new_empty(sum(w.shape[0] for w in weights), weights[0].shape[1], dtype=dtype)
    for weight, rows in zip(weights, stacked.split([w.shape[0] for w in weights])):
        rows.copy_(weight)
    return stacked.view(len(weights) // parts, -1, stacked.shape[-1])


def _grouped_ffn(experts: Sequence[nn.Module], tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Every expert's gated FFN on its group of ``tokens`` (sorted by expert, groups ending at ``offsets``)."""
    tokens = tokens.to(_compute_dtype(tokens))
    gate_up = [w for e in experts for w in (e.gate_proj.weight, e.up_proj.weight)]
    projected = _GroupedLinear.apply(tokens, offsets, 2, *gate_up)
    gate, up = projected.chunk(2, dim=-1)
    # All experts share one activation class and its settings (grouped_ffn_supported), so this is each one's.
    hidden = experts[0].act_fn(gate) * up
    return _GroupedLinear.apply(hidden, offsets, 1, *(e.down_proj.weight for e in experts))


def run_experts(
    tokens: torch.Tensor,
    experts: Sequence[nn.Module],
    weights: torch.Tensor,
    selected: torch.Tensor,
    run_idle: bool,
    implementation: str = "auto",
) -> torch.Tensor:
    """``sum_slots weight * expert(token)`` for every token, a token's slots added in expert order.

    ``implementation`` (the config's ``moe_experts_implementation``, see ``configuration.EXPERTS_IMPLEMENTATIONS``):
    grouped, all experts in one grouped GEMM per
    projection with the group offsets computed on the device (no host sync); or the loop, experts fed their
    tokens in one batch each after a host sync for the counts. ``run_idle`` (loop only; the grouped path always
    involves every expert) also runs experts that got no token: under DDP each trainable expert must take part
    in every step on every rank, or the gradient all-reduce waits for it.
    """
    top_k = selected.shape[-1]
    if tokens.shape[0] == 1 and not run_idle and implementation != "grouped":
        # Decoding one sequence: call the token's experts directly (no sort, gather or scatter, which cost as
        # much as the expert itself at one token), adding in expert order as the batched path below does. On
        # an H200 this decoded at 0.74x the dense model's speed, the grouped path at 0.43x (benchmarks/README.md).
        expert_ids = selected[0].tolist()
        output = None
        for slot in sorted(range(top_k), key=expert_ids.__getitem__):
            contribution = experts[expert_ids[slot]](tokens) * weights[0, slot].to(tokens.dtype)
            output = contribution if output is None else output + contribution
        return output
    grouped = uses_grouped_experts(implementation, experts, tokens)
    order, inverse, sorted_experts, slot_weights = _slot_order(weights, selected)
    slot_tokens = torch.div(order, top_k, rounding_mode="floor")  # the token of each sorted slot
    sorted_tokens = _GatherSlots.apply(tokens, slot_tokens, inverse, top_k)
    if grouped:
        expert_ids = torch.arange(len(experts), device=tokens.device, dtype=sorted_experts.dtype)
        # End of each expert's group among the sorted slots, found on the device.
        offsets = torch.searchsorted(sorted_experts, expert_ids, right=True).to(torch.int32)
        sorted_out = _grouped_ffn(experts, sorted_tokens, offsets)
    else:
        counts = torch.bincount(sorted_experts, minlength=len(experts)).tolist()  # the one host sync of the block
        onednn = tokens.device.type == "cpu" and _compute_dtype(tokens) in (torch.bfloat16, torch.float16)
        multiple = CPU_EXPERT_ROWS_MULTIPLE if onednn else 1
        parts = [
            _run_padded(expert, part, multiple)
            for expert, part, count in zip(experts, sorted_tokens.split(counts), counts)
            if count or run_idle
        ]
        sorted_out = torch.cat(parts) if parts else sorted_tokens  # no part: no token either
    sorted_out = sorted_out * slot_weights[:, None].to(tokens.dtype)
    return _SumSlots.apply(sorted_out, inverse, slot_tokens, top_k)


# oneDNN, which runs the CPU's bf16 and float16 matrix products, builds (and caches) a kernel for every new row
# count, and an expert's row count changes with every batch and layer: on two threads, bf16 products of SmolLM2's
# expert shape ran 15% slower with a new row count each call than with the same counts repeated; float32 (MKL)
# showed no such difference (benchmarks/README.md). Rounded up to a multiple of this, the counts repeat; the
# padding rows (zeros) are dropped from the output, so no gradient comes from them. Fewer rows than that
# (decoding, small batches) run as they are: a product's rows round alike only at the same row count, and the
# one-token decoding path must add exactly as the batched path does.
CPU_EXPERT_ROWS_MULTIPLE = 32


def _run_padded(expert: nn.Module, part: torch.Tensor, multiple: int) -> torch.Tensor:
    """``expert(part)``, its rows padded with zeros to a multiple of ``multiple`` (from ``multiple`` rows on)."""
    rows = part.shape[0]
    padding = -rows % multiple
    if not padding or rows < multiple:
        return expert(part)
    return expert(F.pad(part, (0, 0, 0, padding)))[:rows]


class _GatherSlots(torch.autograd.Function):
    """Each slot's token in expert order, ``tokens[slot_tokens]`` (``slot_tokens = order // top_k``: slot ``s`` is
    token ``s // top_k``'s), in one gather without materialising the k copies of every token first. Its gradient
    gathers back by the inverse permutation and sums a token's k slots, so neither direction scatter-adds: gathers
    are deterministic, where a scatter-add accumulates with atomics on GPUs (on the CPU the two measured alike,
    benchmarks/README.md)."""

    @staticmethod
    def forward(
        ctx, tokens: torch.Tensor, slot_tokens: torch.Tensor, inverse: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return tokens.index_select(0, slot_tokens)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        by_slot = grad_output.index_select(0, inverse)
        return by_slot.view(-1, ctx.top_k, by_slot.shape[-1]).sum(dim=1), None, None, None


class _SumSlots(torch.autograd.Function):
    """Each token's output: its k slots' rows of ``sorted_out`` (expert order) read back by the inverse
    permutation and added in expert order. The gradient is one gather, ``grad[slot_tokens]``, where indexing and
    slicing would let autograd write zero-filled ``[tokens, k, hidden]`` gradients for every slot and add them."""

    @staticmethod
    def forward(
        ctx, sorted_out: torch.Tensor, inverse: torch.Tensor, slot_tokens: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        ctx.save_for_backward(slot_tokens)
        slots = sorted_out.index_select(0, inverse).view(-1, top_k, sorted_out.shape[-1])
        output = slots[:, 0]
        for slot in range(1, top_k):
            output = output + slots[:, slot]
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (slot_tokens,) = ctx.saved_tensors
        return grad_output.index_select(0, slot_tokens), None, None, None


def _slot_order(
    weights: torch.Tensor, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token slots (token by token) sorted by expert: the permutation, its inverse, the expert of each sorted
    slot and the sorted slots' weights. Each token's slots are put in expert order first, so that the sum over a
    token's slots adds its experts in the same order whichever path ran them."""
    selected, slot_order = selected.sort(dim=-1, stable=True)
    weights = weights.gather(-1, slot_order)
    flat_experts = selected.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse, flat_experts[order], weights.reshape(-1)[order]


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


def routing_stat_tensors(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    token_mask: torch.Tensor | None = None,
    lang_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``routing_stats`` as 0-dim float tensors on the logits' device, computed without reading anything on the
    host, so the training loop can log every micro-batch without a host sync. A value this batch cannot give
    (no old-language token) is NaN instead of absent: its absence is data the host has not seen."""
    if not router_logits:
        return {}
    num_experts = max(logits.shape[-1] for logits in router_logits)
    device = router_logits[0].device
    counted = token_mask.reshape(-1).to(device, torch.float32) if token_mask is not None else None
    old = lang_mask.reshape(-1).to(device, torch.float32) if lang_mask is not None else None
    if old is not None and counted is not None:
        old = old * counted
    # Masks as weights, not boolean indexing: indexing would read the mask's count on the host. Every layer routes
    # the same tokens, so the slot weights and the counts are the same for all.
    tokens = router_logits[0].shape[0]
    slot_weights = (counted if counted is not None else torch.ones(tokens, device=device))[:, None]
    slot_weights = slot_weights.expand(tokens, top_k).reshape(-1)
    slots_counted = slot_weights.sum().clamp(min=1.0)
    old_counted = old.sum() if old is not None else None
    shares = torch.zeros(num_experts, device=device)
    expert0_shares = []
    for logits in router_logits:
        logits = logits.detach().float()
        selected = torch.topk(logits, top_k, dim=-1).indices
        shares += torch.zeros(num_experts, device=device).scatter_add_(0, selected.reshape(-1), slot_weights)
        if old is not None:
            expert0_shares.append(((logits.argmax(dim=-1) == 0).float() * old).sum() / old_counted)  # 0/0 = NaN
    shares = shares / slots_counted
    stats = {f"expert_share_{i}": shares[i] / len(router_logits) for i in range(num_experts)}
    if expert0_shares:
        stats["old_lang_expert0_top1_share"] = torch.stack(expert0_shares).mean()
    return stats


def as_floats(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors as floats in one host transfer, leaving out the NaNs (values a batch could not give)."""
    values = torch.stack([t.float() for t in tensors.values()]).tolist() if tensors else []
    return {key: value for key, value in zip(tensors, values) if not math.isnan(value)}


def routing_stats(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    token_mask: torch.Tensor | None = None,
    lang_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Routing summary averaged over MoE layers, for training logs.

    ``expert_share_{i}``: share of top-k routing slots taken by expert ``i`` (non-padding tokens; layers with
    fewer experts count 0 for the experts they lack). ``old_lang_expert0_top1_share``: share of old-language
    tokens whose top-1 expert is expert 0 (absent when the batch has no old-language token).
    """
    return as_floats(routing_stat_tensors(router_logits, top_k, token_mask, lang_mask))
