"""How an MoE block runs its routed experts on the tokens routed to them (``run_experts``): one grouped GEMM per
projection, or the experts one after another; the tokens sorted by expert by permutations in both."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import ExpertsImplementationError, check_experts_implementation


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


# The dtypes ``torch._grouped_mm`` computes in (its own check, on the CPU and CUDA alike).
GROUPED_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# CUDA compute capabilities (major versions) where ``torch._grouped_mm`` gives experts with an empty group a zero
# weight gradient. On SM100 (Blackwell) PyTorch reports non-zero ones (pytorch/pytorch#172439): a new expert that
# got no token would still move, so ``"auto"`` runs the loop there until a release is known to fix it.
AUTO_GROUPED_CAPABILITY_MAJORS = (8, 9)


def auto_groups_experts(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype) -> bool:
    """Whether ``"auto"`` may run groupable experts as one grouped GEMM: on CUDA (``capability`` the device's
    compute capability, ``None`` where it is not an NVIDIA one) in bf16 on SM 8.x or 9.x. The loop otherwise, the
    CPU included, where whole training steps measured slower grouped than looped in bf16 and float32 (stacking the
    weights costs more than the per-expert calls it saves; benchmarks/README.md)."""
    return (
        device_type == "cuda"
        and dtype == torch.bfloat16
        and capability is not None
        and capability[0] in AUTO_GROUPED_CAPABILITY_MAJORS
    )


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """``device``'s CUDA compute capability; ``None`` off CUDA and on ROCm (which reports its GFX version there)."""
    if device.type != "cuda" or torch.version.hip:
        return None
    return torch.cuda.get_device_capability(device)


def uses_grouped_experts(implementation: str, experts: Sequence[nn.Module], tokens: torch.Tensor) -> bool:
    """``"auto"``: grouped where :func:`auto_groups_experts` says so and the experts can be grouped; ``"grouped"``
    is refused with a one-line error where the experts cannot be grouped or ``torch._grouped_mm`` cannot compute
    in the tokens' dtype."""
    if implementation == "loop":
        return False
    dtype = _compute_dtype(tokens)
    if implementation == "grouped":
        if dtype not in GROUPED_GEMM_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in GROUPED_GEMM_DTYPES)
            raise ExpertsImplementationError(
                f"moe_experts_implementation='grouped' computes in {names} (torch._grouped_mm), not "
                f"{str(dtype).removeprefix('torch.')}; use 'auto' or 'loop'."
            )
        if not grouped_ffn_supported(experts, tokens):
            raise ExpertsImplementationError(
                "moe_experts_implementation='grouped' needs bias-free gated FFN experts whose weights are plain "
                "tensors of the tokens' dtype (not ZeRO-3 partitions or PEFT layers); use 'auto' or 'loop'."
            )
        return True
    # The device and dtype first: they are cheap, and this runs for every layer at every decoded token.
    return auto_groups_experts(tokens.device.type, cuda_capability(tokens.device), dtype) and grouped_ffn_supported(
        experts, tokens
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
    grouped, all experts in one grouped GEMM per projection with the group offsets computed on the device (no host
    sync); or the loop, experts fed their tokens in one batch each after a host sync for the counts. ``run_idle`` (loop only; the grouped path always
    involves every expert) also runs experts that got no token: under DDP each trainable expert must take part
    in every step on every rank, or the gradient all-reduce waits for it.
    """
    # The config checks the value it is built with; this one may have been set on it since.
    check_experts_implementation(implementation)
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
