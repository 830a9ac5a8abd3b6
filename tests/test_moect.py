"""The MoE-CT model: function preservation, the block's formula, fusion weights, gradients, config checks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForCausalLM

import moelpr
from moelpr.models import MOE_FAMILIES, MoECTBlock, fusion_stats
from moelpr.upcycling.settings import UpcycleSettings
from moelpr.upcycling.upcycle import upcycle

torch.set_num_threads(2)


def _batch(vocab: int, batch: int = 3, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    lang_mask = torch.zeros_like(input_ids)
    lang_mask[1:, : seq // 2] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "lang_mask": lang_mask}


@pytest.fixture(scope="module")
def moect(moect_llama_dir):
    return AutoModelForCausalLM.from_pretrained(moect_llama_dir).eval()


def _perturb(model, seed: int = 0) -> None:
    """Make routed experts differ from the frozen FFN and give the fusion layer non-trivial weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.moe_blocks():
            for j, expert in enumerate(block.new_experts):
                expert.down_proj.weight.mul_(1.0 + 0.5 * (j + 1))
            block.fusion.weight.copy_(torch.randn(block.fusion.weight.shape, generator=g) * 0.3)
            block.fusion.bias.copy_(torch.tensor([0.2, -0.1]))


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
@pytest.mark.parametrize("num_experts,top_k,moe_layers", [(2, 1, None), (3, 2, [1, 3])])
def test_upcycled_moect_model_computes_the_dense_function(
    family, num_experts, top_k, moe_layers, tiny_dense_dir, tmp_path
):
    dense_dir = tiny_dense_dir(family)
    settings = UpcycleSettings(num_experts=num_experts, top_k=top_k, moe_layers=moe_layers, seed=3, method="moe_ct")
    out = upcycle(dense_dir, tmp_path / "ct", settings)
    assert json.loads((out / "config.json").read_text())["moe_method"] == "ct"
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    moe = AutoModelForCausalLM.from_pretrained(out)
    expected_layers = moe_layers or [0, 1, 2, 3]
    assert [isinstance(layer.mlp, MoECTBlock) for layer in moe.model.layers] == [i in expected_layers for i in range(4)]
    block = moe.model.layers[expected_layers[0]].mlp
    assert (len(block.new_experts), block.router.out_features, block.top_k) == (num_experts, num_experts, top_k)
    batch = _batch(dense.config.vocab_size)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        dense_logits = dense(**inputs).logits
        assert (moe(**inputs).logits - dense_logits).abs().max().item() <= 1e-5
        # Whatever the fusion layer says: the routed experts are copies of the FFN and the two weights sum to 1.
        for b in moe.moe_blocks():
            b.fusion.weight.normal_(0.0, 1.0)
            b.fusion.bias.normal_(0.0, 1.0)
        assert (moe(**inputs).logits - dense_logits).abs().max().item() <= 1e-5


def test_block_computes_the_fused_output_of_its_routed_experts_and_the_frozen_ffn(moect_llama_dir):
    """``out = c0 * sum_k w_k E_k(h) + c1 * ffn(h)`` with ``c = softmax(W_c h + b)``, token by token."""
    model = AutoModelForCausalLM.from_pretrained(moect_llama_dir, num_experts_per_tok=2).eval()
    _perturb(model)
    block = model.moe_blocks()[1]
    h = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = block(h).reshape(-1, h.shape[-1])
        expected = []
        for token in h.reshape(-1, h.shape[-1]):
            probs = F.softmax(token @ block.router.weight.T, dim=-1)
            top = torch.topk(probs, 2)
            weights = top.values / top.values.sum()
            routed = sum(w * block.new_experts[int(i)](token) for w, i in zip(weights, top.indices))
            c = F.softmax(token @ block.fusion.weight.T + block.fusion.bias, dim=-1)
            expected.append(c[0] * routed + c[1] * block.original_expert(token))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_fusion_weights_are_reported_per_layer_and_token(moect):
    _perturb(moect)
    batch = _batch(moect.config.vocab_size)
    seen = []
    handles = [b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
               for b in moect.moe_blocks()]
    try:
        with torch.no_grad():
            out = moect(input_ids=batch["input_ids"], output_router_logits=True)
    finally:
        for handle in handles:
            handle.remove()
    assert len(out.ffn_fusion_weights) == len(out.router_logits) == 4
    for block, h, weight in zip(moect.moe_blocks(), seen, out.ffn_fusion_weights):
        assert weight.shape == (batch["input_ids"].numel(),) and weight.dtype == torch.float32
        torch.testing.assert_close(weight, F.softmax(block.fusion(h), dim=-1)[:, 1])
    # No LPR loss in MoE-CT, and plain forwards carry no statistics.
    with torch.no_grad():
        train_like = moect(**batch)
        plain = moect(input_ids=batch["input_ids"])
    assert train_like.lpr_loss is None and train_like.aux_loss is not None and train_like.ffn_fusion_weights is None
    assert plain.ffn_fusion_weights is None and plain.router_logits is None


def _reference_balance(logits: torch.Tensor, top_k: int, valid: torch.Tensor) -> torch.Tensor:
    probs = F.softmax(logits.float(), dim=-1)[valid]
    slots = F.one_hot(torch.topk(probs, top_k).indices, probs.shape[-1]).float().sum(dim=1)
    return probs.shape[-1] * (slots.mean(dim=0) * probs.mean(dim=0)).sum()


def _grads(model, batch, trainable: tuple[str, ...], gradient_checkpointing: str | None):
    for name, param in model.named_parameters():
        param.requires_grad_(any(f".{part}." in f".{name}" for part in trainable))
    model.zero_grad(set_to_none=True)
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": gradient_checkpointing == "reentrant"})
    try:
        model(**batch).loss.backward()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("trainable", [("router", "fusion"), ("router", "fusion", "new_experts", "embed_tokens")],
                         ids=["router_and_fusion", "with_experts_and_embeddings"])
@pytest.mark.parametrize("gradient_checkpointing", [None, "reentrant", "non_reentrant"])
def test_gradients_reach_the_router_and_the_fusion_layer(moect_llama_dir, trainable, gradient_checkpointing):
    model = AutoModelForCausalLM.from_pretrained(moect_llama_dir, router_aux_loss_coef=0.5)
    _perturb(model)
    batch = _batch(model.config.vocab_size)
    got = _grads(model, batch, trainable, gradient_checkpointing)

    # Reference: the same objective with the balance loss written on the returned (differentiable) router logits.
    model.zero_grad(set_to_none=True)
    out = model(**batch, output_router_logits=True)
    valid = batch["attention_mask"].reshape(-1).bool()
    balance = torch.stack([_reference_balance(lg, 1, valid) for lg in out.router_logits]).mean()
    (out.lm_loss + 0.5 * balance).backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    assert got.keys() == expected.keys()
    assert {n.split(".mlp.")[1].split(".")[0] for n in got if ".mlp." in n} >= {"router", "fusion"}
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
        assert grad.abs().max() > 0, name


def test_config_refuses_the_lpr_loss_and_unknown_methods(moect_llama_dir):
    saved = moelpr.LlamaMoELPRConfig.from_pretrained(moect_llama_dir).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        saved.pop(key, None)

    def config(**changes):
        return moelpr.LlamaMoELPRConfig(**{**saved, **changes})

    with pytest.raises(StrictDataclassClassValidationError, match="lpr_loss_coef must be 0 for MoE-CT"):
        config(lpr_loss_coef=0.1)
    with pytest.raises(StrictDataclassClassValidationError, match="moe_method must be one of"):
        config(moe_method="moe_ct")
    with pytest.raises(StrictDataclassClassValidationError, match="at least 1 routed expert"):
        config(num_experts=0, num_experts_per_tok=1)
    assert config(num_experts=1, num_experts_per_tok=1).moe_method == "ct"  # one routed expert is a valid MoE-CT
    with pytest.raises(StrictDataclassClassValidationError, match="at least 2 experts"):
        config(moe_method="lpr", num_experts=1, num_experts_per_tok=1)


def test_generation_with_kv_cache_matches_generation_without(moect):
    prompt = _batch(moect.config.vocab_size)["input_ids"][1:2, :5]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": moect.config.pad_token_id}
    assert torch.equal(moect.generate(prompt, use_cache=True, **kwargs), moect.generate(prompt, use_cache=False, **kwargs))


def test_fusion_stats_average_over_layers_and_languages():
    layers = [torch.tensor([0.9, 0.5, 0.1, 0.7]), torch.tensor([0.7, 0.3, 0.3, 0.1])]
    token_mask = torch.tensor([1, 1, 1, 0])  # the last token is padding
    lang_mask = torch.tensor([1, 0, 0, 1])  # tokens 0 and 3 old-language
    stats = fusion_stats(layers, token_mask, lang_mask)
    assert stats["ffn_fusion_weight"] == pytest.approx(((0.9 + 0.5 + 0.1) / 3 + (0.7 + 0.3 + 0.3) / 3) / 2)
    assert stats["old_lang_ffn_fusion_weight"] == pytest.approx((0.9 + 0.7) / 2)
    assert stats["new_lang_ffn_fusion_weight"] == pytest.approx(((0.5 + 0.1) / 2 + (0.3 + 0.3) / 2) / 2)
    assert set(fusion_stats(layers, token_mask, torch.zeros(4))) == {"ffn_fusion_weight", "new_lang_ffn_fusion_weight"}
    assert set(fusion_stats(layers)) == {"ffn_fusion_weight"} and fusion_stats([]) == {}
