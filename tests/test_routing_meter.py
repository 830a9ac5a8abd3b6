"""The routing statistics the trainer logs every micro-batch are computed and summed on the training device,
without a host read: on the meta device (which has no data) any `.item()`, `.cpu()`, `bool()` or boolean-mask
indexing raises. A GPU run found the meter's CPU sums refusing the CUDA values (benchmarks/README.md)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moelpr.llamafactory_plugin.trainer import RoutingMeter
from moelpr.models import fusion_stat_tensors, fusion_stats, routing_stat_tensors, routing_stats


def _logits(tokens: int = 6, experts: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, experts, generator=generator) for _ in range(3)]


def test_stats_and_meter_never_read_the_device_on_the_host():
    meta = [logits.to("meta") for logits in _logits()]
    token_mask = torch.ones(6, device="meta")
    lang_mask = torch.ones(6, device="meta")
    values = routing_stat_tensors(meta, 2, token_mask, lang_mask)
    values.update(fusion_stat_tensors([torch.rand(6).to("meta")] * 2, token_mask, lang_mask))
    values["lm_loss"] = torch.tensor(2.0, device="meta") / torch.tensor(0.5, device="meta")
    assert all(value.device.type == "meta" and value.dim() == 0 for value in values.values())
    meter = RoutingMeter(num_experts=4, device="meta")
    meter.add(values)  # would raise on any host read, or on sums kept on another device
    assert meter._sums.device.type == "meta"


def test_tensor_stats_match_the_float_stats_and_mark_what_a_batch_cannot_give_as_nan():
    logits = _logits()
    token_mask = torch.tensor([1, 1, 1, 1, 0, 0])
    lang_mask = torch.tensor([1, 0, 1, 0, 1, 0])
    tensors = routing_stat_tensors(logits, 2, token_mask, lang_mask)
    floats = routing_stats(logits, 2, token_mask, lang_mask)
    assert floats.keys() == tensors.keys()
    assert all(floats[key] == pytest.approx(tensors[key].item()) for key in floats)

    no_old = routing_stat_tensors(logits, 2, token_mask, torch.zeros(6))
    assert math.isnan(no_old["old_lang_expert0_top1_share"].item())
    assert "old_lang_expert0_top1_share" not in routing_stats(logits, 2, token_mask, torch.zeros(6))
    weights = [torch.rand(6), torch.rand(6)]
    assert math.isnan(fusion_stat_tensors(weights, token_mask, torch.zeros(6))["old_lang_ffn_fusion_weight"].item())
    assert set(fusion_stats(weights, token_mask, torch.zeros(6))) == {"ffn_fusion_weight", "new_lang_ffn_fusion_weight"}


def test_meter_averages_what_was_given_and_skips_nan():
    meter = RoutingMeter(num_experts=2, device="cpu")
    meter.add({"lm_loss": torch.tensor(2.0), "aux_loss": 1.0, "old_lang_expert0_top1_share": torch.tensor(0.25)})
    meter.add({"lm_loss": torch.tensor(4.0), "aux_loss": 3.0, "old_lang_expert0_top1_share": torch.tensor(math.nan)})
    accelerator = SimpleNamespace(device=torch.device("cpu"), reduce=lambda tensor, reduction: tensor)
    assert meter.summary(accelerator) == {"lm_loss": 3.0, "aux_loss": 2.0, "old_lang_expert0_top1_share": 0.25}
    assert meter.summary(accelerator) == {}  # the sums start again after each log
