"""Routing statistics for the training logs: each expert's share of the routing slots, MoE-LPR's use of expert 0
on old-language tokens and MoE-CT's fusion weight on the frozen FFN; and the one declaration of the names they are
logged and reported under, which the trainer, the web UI and the reports import (tests/test_log_keys.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Training-log keys: trainer_state.json, trainer_log.jsonl, LlamaBoard's log and the loss plots (training_<key>.png).
LM_LOSS_KEY = "lm_loss"
AUX_LOSS_KEY = "aux_loss"  # the load-balancing loss
LPR_LOSS_KEY = "lpr_loss"
LOSS_KEYS = (LM_LOSS_KEY, AUX_LOSS_KEY, LPR_LOSS_KEY)
EXPERT_SHARE_PREFIX = "expert_share_"  # followed by the expert's index (expert_share_key)
OLD_LANG_EXPERT0_TOP1_SHARE_KEY = "old_lang_expert0_top1_share"
FFN_FUSION_WEIGHT_KEY = "ffn_fusion_weight"  # also routing.json's, per layer
OLD_LANG_FFN_FUSION_WEIGHT_KEY = "old_lang_ffn_fusion_weight"
NEW_LANG_FFN_FUSION_WEIGHT_KEY = "new_lang_ffn_fusion_weight"
FUSION_KEYS = (FFN_FUSION_WEIGHT_KEY, OLD_LANG_FFN_FUSION_WEIGHT_KEY, NEW_LANG_FFN_FUSION_WEIGHT_KEY)

# The evaluation's routing.json, per language and MoE layer (beside FFN_FUSION_WEIGHT_KEY for MoE-CT).
EXPERT0_TOP1_SHARE_KEY = "expert0_top1_share"
TOP1_SHARE_KEY = "top1_share"
MEAN_ROUTER_PROB_KEY = "mean_router_prob"


def expert_share_key(expert: int) -> str:
    return f"{EXPERT_SHARE_PREFIX}{expert}"


def training_log_keys(num_experts: int) -> list[str]:
    """Every key a training run of a model with up to ``num_experts`` experts per layer may log."""
    shares = [expert_share_key(i) for i in range(num_experts)]
    return [*LOSS_KEYS, *shares, OLD_LANG_EXPERT0_TOP1_SHARE_KEY, *FUSION_KEYS]


def is_routing_log_key(key: str) -> bool:
    """Whether a training-log key is one of these (the others are the trainer's own: loss, learning rate...)."""
    return key.startswith(EXPERT_SHARE_PREFIX) or key in (*LOSS_KEYS, OLD_LANG_EXPERT0_TOP1_SHARE_KEY, *FUSION_KEYS)


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
    stats = {expert_share_key(i): shares[i] / len(router_logits) for i in range(num_experts)}
    if expert0_shares:
        stats[OLD_LANG_EXPERT0_TOP1_SHARE_KEY] = torch.stack(expert0_shares).mean()
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


def fusion_stat_tensors(
    ffn_weights: Sequence[torch.Tensor], token_mask: torch.Tensor | None = None, lang_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``fusion_stats`` as 0-dim tensors on the weights' device, without a host sync (see ``routing_stat_tensors``):
    a group this batch has no token of is NaN."""
    if not ffn_weights:
        return {}
    device = ffn_weights[0].device
    valid = token_mask.reshape(-1).to(device, torch.float32) if token_mask is not None else None
    groups = {FFN_FUSION_WEIGHT_KEY: valid}
    if lang_mask is not None:
        old = lang_mask.reshape(-1).to(device, torch.float32)
        everything = valid if valid is not None else torch.ones_like(old)
        groups[OLD_LANG_FFN_FUSION_WEIGHT_KEY] = old * everything
        groups[NEW_LANG_FFN_FUSION_WEIGHT_KEY] = (1.0 - old) * everything
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
