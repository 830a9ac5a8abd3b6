"""The MoE-LPR model: function preservation, round trip, router losses, gradients, generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import moelpr
from moelpr.models import MOE_FAMILIES
from moelpr.upcycling.settings import UpcycleSettings
from moelpr.upcycling.upcycle import upcycle

torch.set_num_threads(2)


def _batch(vocab: int, batch: int = 3, seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0  # right padding on one row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    lang_mask = torch.zeros_like(input_ids)
    lang_mask[1:, : seq // 2] = 1  # old-language tokens on two rows
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "lang_mask": lang_mask}


@pytest.fixture(scope="module")
def llama_moe(upcycled_llama_dir):
    return AutoModelForCausalLM.from_pretrained(upcycled_llama_dir)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
@pytest.mark.parametrize(
    "num_experts,top_k,moe_layers,expected_counts",
    [(4, 2, None, [4, 4, 4, 4]), (4, 1, "1,3", [None, 4, None, 4]), ("0:3,2-3:2", 2, None, [3, None, 2, 2])],
)
def test_upcycled_model_computes_the_dense_function(
    family, num_experts, top_k, moe_layers, expected_counts, tiny_dense_dir, tmp_path
):
    dense_dir = tiny_dense_dir(family)
    settings = UpcycleSettings(num_experts=num_experts, top_k=top_k, moe_layers=moe_layers, seed=3)
    out = upcycle(dense_dir, tmp_path / "moe", settings)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert type(moe) is MOE_FAMILIES[family][1]
    counts = [
        len(layer.mlp.routed_experts()) if isinstance(layer.mlp, moelpr.models.MoELPRSparseBlock) else None
        for layer in moe.model.layers
    ]
    assert counts == expected_counts
    batch = _batch(dense.config.vocab_size)
    with torch.no_grad():
        dense_logits = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        moe_logits = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (moe_logits - dense_logits).abs().max().item() <= 1e-5


def test_save_and_load_round_trip_exactly(llama_moe, tmp_path):
    llama_moe.save_pretrained(tmp_path / "again")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    original_state, reloaded_state = llama_moe.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for name, tensor in original_state.items():
        assert torch.equal(tensor, reloaded_state[name]), name
    differing = {k for k, v in reloaded.config.to_dict().items() if llama_moe.config.to_dict().get(k) != v}
    assert differing == {"_name_or_path"}


def _reference_balance(probs: torch.Tensor, top_k: int, valid: torch.Tensor) -> torch.Tensor:
    """Mixtral's (the authors') balance loss written out per choice, token and expert, independent of the
    library's vectorised form: ``N * sum_choice sum_e f[choice, e] * P[e]``, where ``f[choice, e]`` is the share
    of tokens whose choice-th pick is expert ``e``."""
    num_experts = probs.shape[1]
    tokens = [t for t in range(probs.shape[0]) if valid[t]]
    total = 0.0
    for choice in range(top_k):
        for e in range(num_experts):
            picked = [t for t in tokens if torch.topk(probs[t], top_k).indices[choice].item() == e]
            total = total + (len(picked) / len(tokens)) * probs[tokens, e].mean()
    return num_experts * total


def _reference_lpr(logits: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    picked = [-(logits[t].exp()[0] / logits[t].exp().sum()).log() for t in range(logits.shape[0]) if old[t]]
    return torch.stack(picked).mean()


def test_router_losses_match_an_independent_reference(llama_moe):
    model = llama_moe
    model.config.lpr_loss_coef = 0.3
    batch = _batch(model.config.vocab_size)
    try:
        model.train()  # the router losses join the loss only in training (no dropout in the tiny config)
        out = model(**batch, output_router_logits=True)
    finally:
        model.config.lpr_loss_coef = 0.0
        model.eval()
    valid = batch["attention_mask"].reshape(-1).bool()
    old = batch["lang_mask"].reshape(-1).bool() & valid
    assert len(out.router_logits) == 4
    balance = torch.stack(
        [_reference_balance(F.softmax(lg.float(), -1), 2, valid) for lg in out.router_logits]
    ).mean()
    lpr = torch.stack([_reference_lpr(lg.float(), old) for lg in out.router_logits]).mean()
    lm = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert out.aux_loss.item() == pytest.approx(balance.item(), rel=1e-5)
    assert out.lpr_loss.item() == pytest.approx(lpr.item(), rel=1e-5)
    assert out.lm_loss.item() == pytest.approx(lm.item(), rel=1e-5)
    expected = lm + 0.01 * balance + 0.3 * lpr
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_balance_loss_has_the_authors_scale(llama_moe):
    """Mixtral's scale, the authors': top-k at even routing and with an all-zero router, whatever N."""
    from moelpr.models.moe import load_balancing_loss, route

    for num_experts, top_k in ((4, 2), (4, 1), (8, 2)):
        logits = torch.zeros(6, num_experts)
        probs, _, selected = route(logits, top_k)
        assert load_balancing_loss(probs, selected, None).item() == pytest.approx(top_k)


def test_eval_loss_is_the_lm_loss(llama_moe):
    """In evaluation the router losses are reported beside the loss, never inside it (eval_perplexity)."""
    batch = _batch(llama_moe.config.vocab_size)
    llama_moe.config.lpr_loss_coef, llama_moe.config.router_aux_loss_coef = 5.0, 5.0
    try:
        out = llama_moe(**batch)
    finally:
        llama_moe.config.lpr_loss_coef, llama_moe.config.router_aux_loss_coef = 0.0, 0.01
    assert not llama_moe.training
    assert out.aux_loss.item() > 0 and out.lpr_loss.item() > 0
    assert out.loss.item() == out.lm_loss.item()


def test_new_language_tokens_get_no_lpr_term(llama_moe):
    batch = _batch(llama_moe.config.vocab_size)
    batch["lang_mask"] = torch.zeros_like(batch["lang_mask"])
    assert llama_moe(**batch).lpr_loss.item() == 0.0
    batch.pop("lang_mask")
    assert llama_moe(**batch).lpr_loss.item() == 0.0


def _router_grads(model, batch, gradient_checkpointing: str | None, loss_factor: float = 1.0):
    model.zero_grad(set_to_none=True)
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": gradient_checkpointing == "reentrant"})
    try:
        out = model(**batch)
        (out.loss * loss_factor).backward()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    return [block.router.weight.grad.clone() for block in model.moe_blocks()]


def _explicit_router_grads(model, batch):
    """Gradient of the objective written with differentiable router logits (no checkpointing)."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, output_router_logits=True)
    valid = batch["attention_mask"].reshape(-1).bool()
    old = batch["lang_mask"].reshape(-1).bool() & valid
    aux = torch.stack([_reference_balance(F.softmax(lg.float(), -1), 2, valid) for lg in out.router_logits]).mean()
    lpr = torch.stack([_reference_lpr(lg.float(), old) for lg in out.router_logits]).mean()
    objective = out.lm_loss + model.config.router_aux_loss_coef * aux + model.config.lpr_loss_coef * lpr
    objective.backward()
    return [block.router.weight.grad.clone() for block in model.moe_blocks()]


@pytest.mark.parametrize("gradient_checkpointing", [None, "reentrant", "non_reentrant"])
def test_router_losses_reach_the_router_gradient(upcycled_llama_dir, gradient_checkpointing):
    model = AutoModelForCausalLM.from_pretrained(upcycled_llama_dir, router_aux_loss_coef=0.5, lpr_loss_coef=2.0)
    # Train the router only, as in the review stage: every other tensor is frozen, so under
    # reentrant checkpointing the layer inputs carry no gradient, the case that loses router losses
    # in implementations that collect router logits after the forward pass.
    for name, param in model.named_parameters():
        param.requires_grad_(".router." in name)
    batch = _batch(model.config.vocab_size)
    expected = _explicit_router_grads(model, batch)
    got = _router_grads(model, batch, gradient_checkpointing)
    lm_only = AutoModelForCausalLM.from_pretrained(upcycled_llama_dir, router_aux_loss_coef=0.0, lpr_loss_coef=0.0)
    for name, param in lm_only.named_parameters():
        param.requires_grad_(".router." in name)
    without_router_losses = _router_grads(lm_only, batch, None)
    for g, e, w in zip(got, expected, without_router_losses):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
        assert (g - w).abs().max() > 1e-4  # the router losses changed the gradient


def test_router_loss_gradient_follows_the_trainer_loss_scaling(upcycled_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(upcycled_llama_dir, router_aux_loss_coef=0.5, lpr_loss_coef=2.0)
    batch = _batch(model.config.vocab_size)
    full = _router_grads(model, batch, "reentrant")
    quarter = _router_grads(model, batch, "reentrant", loss_factor=0.25)  # e.g. gradient accumulation of 4
    for f, q in zip(full, quarter):
        torch.testing.assert_close(q, f * 0.25, rtol=1e-4, atol=1e-8)


def test_router_losses_are_weighted_by_the_micro_batch_share_of_tokens(llama_moe):
    batch = _batch(llama_moe.config.vocab_size)
    labelled = int((batch["labels"] != -100).sum())
    predicted = int((batch["labels"][:, 1:] != -100).sum())
    plain = llama_moe(**batch)
    # As the trainer counts them: this micro-batch holds a quarter of the step's labels.
    shared = llama_moe(**batch, num_items_in_batch=torch.tensor(labelled * 4))
    # The LM loss is summed over this batch's predicted tokens and divided by the step's labels;
    # the router terms, per-batch means, get this micro-batch's share of the step.
    lm_part = plain.lm_loss.item() * predicted / (labelled * 4)
    router_part = (plain.loss - plain.lm_loss).item() / 4
    assert shared.loss.item() == pytest.approx(lm_part + router_part, rel=1e-5)


def test_expert_without_tokens_still_takes_part_in_backward(upcycled_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(upcycled_llama_dir, num_experts_per_tok=1)
    model.train()  # experts without tokens run only in training, where DDP needs them
    for block in model.moe_blocks():
        # Every token's top-1 is expert 0, so experts 1..3 receive no token in this step.
        block.router.register_forward_hook(lambda mod, args, out: out + torch.tensor([50.0, 0.0, 0.0, 0.0]))
    batch = _batch(model.config.vocab_size)
    model(**batch).loss.backward()
    for block in model.moe_blocks():
        for expert in block.new_experts:
            for param in expert.parameters():
                assert param.grad is not None and torch.count_nonzero(param.grad) == 0


def test_generation_with_kv_cache_matches_generation_without(llama_moe):
    prompt = _batch(llama_moe.config.vocab_size)["input_ids"][1:2, :5]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": llama_moe.config.pad_token_id}
    with_cache = llama_moe.generate(prompt, use_cache=True, **kwargs)
    without_cache = llama_moe.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (1, 13)
    assert torch.equal(with_cache, without_cache)


def test_routing_stats_summarise_router_logits():
    # Two layers, four tokens; the last token is padding.
    layer = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 3.0, 2.0, 0.0], [3.0, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 2.0]])
    token_mask = torch.tensor([1, 1, 1, 0])
    lang_mask = torch.tensor([1, 1, 0, 1])
    stats = moelpr.routing_stats([layer, layer], top_k=2, token_mask=token_mask, lang_mask=lang_mask)
    # Valid slots: {0,1}, {1,2}, {0,3}: expert 0 has 2 of 6, expert 1 2 of 6, experts 2 and 3 1 each.
    assert stats["expert_share_0"] == pytest.approx(2 / 6)
    assert stats["expert_share_3"] == pytest.approx(1 / 6)
    assert math.isclose(sum(stats[f"expert_share_{i}"] for i in range(4)), 1.0, rel_tol=1e-6)
    # Old-language valid tokens are 0 and 1; only token 0 has top-1 expert 0.
    assert stats["old_lang_expert0_top1_share"] == pytest.approx(0.5)


def test_lang_mask_of_the_wrong_shape_is_refused(llama_moe):
    batch = _batch(llama_moe.config.vocab_size)
    batch["lang_mask"] = batch["lang_mask"][:, :-1]
    with pytest.raises(ValueError, match="lang_mask must have the shape"):
        llama_moe(**batch)


def test_top1_routing_keeps_the_dense_function_and_lets_the_lm_loss_teach_the_router(tiny_llama_dir, tmp_path):
    out = upcycle(tiny_llama_dir, tmp_path / "top1", UpcycleSettings(num_experts=4, top_k=1, seed=5))
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    moe = AutoModelForCausalLM.from_pretrained(out, router_aux_loss_coef=0.0, lpr_loss_coef=0.0)
    batch = _batch(dense.config.vocab_size)
    with torch.no_grad():
        dense_logits = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        moe_logits = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (moe_logits - dense_logits).abs().max().item() <= 1e-5
    # Make the new experts differ from expert 0, so the routing decision matters to the LM loss.
    with torch.no_grad():
        for block in moe.moe_blocks():
            for expert in block.new_experts:
                expert.down_proj.weight.mul_(1.5)
    grads = _router_grads(moe, batch, None)
    assert all(g.abs().max() > 1e-6 for g in grads)


def test_plain_forward_does_no_routing_bookkeeping(llama_moe):
    """Without labels and without a request for router logits, the blocks see no routing context (no losses,
    no records, no device syncs for them)."""
    from moelpr.models.moe import current_routing_context

    seen = []
    handles = [
        block.register_forward_hook(lambda *_: seen.append(current_routing_context())) for block in llama_moe.moe_blocks()
    ]
    try:
        batch = _batch(llama_moe.config.vocab_size)
        out = llama_moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        llama_moe(**batch)
    finally:
        for handle in handles:
            handle.remove()
    assert out.aux_loss is None and out.router_logits is None
    assert seen[:4] == [None] * 4 and all(context is not None for context in seen[4:8])


def test_concurrent_forwards_get_what_each_gets_alone(llama_moe):
    """One model, several threads (an API server under load, a thread pool): each forward keeps its own masks."""
    from concurrent.futures import ThreadPoolExecutor

    vocab = llama_moe.config.vocab_size
    batches = []
    for i in range(8):
        batch = _batch(vocab, batch=1 + i % 3, seq=6 + 3 * i, seed=10 + i)
        g = torch.Generator().manual_seed(i)
        batch["lang_mask"] = (torch.rand(batch["input_ids"].shape, generator=g) < 0.5).long()
        batches.append(batch)

    def run(batch):
        with torch.no_grad():
            out = llama_moe(**batch, output_router_logits=True)
        return out.logits, out.lm_loss, out.aux_loss, out.lpr_loss, out.router_logits

    alone = [run(batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(run, batches * 3))
    for i, got in enumerate(together):
        want = alone[i % len(batches)]
        assert torch.equal(got[0], want[0])
        for g, w in zip(got[1:4], want[1:4]):
            assert torch.equal(g, w), i
        assert all(torch.equal(g, w) for g, w in zip(got[4], want[4]))


def test_single_token_path_adds_like_the_batched_path(llama_moe):
    """Decoding one token skips the sort/gather/scatter; its sum must be the batched path's, bit for bit."""
    from moelpr.models.moe import route, run_experts

    block = llama_moe.moe_blocks()[0]
    with torch.no_grad():
        block.router.weight.normal_(generator=torch.Generator().manual_seed(0))
        for expert in block.new_experts:
            expert.down_proj.weight.mul_(1.3)
        token = torch.randn(1, llama_moe.config.hidden_size, generator=torch.Generator().manual_seed(1))
        _, weights, selected = route(block.router(token), 3)
        direct = run_experts(token, block.routed_experts(), weights, selected, run_idle=False)
        batched = run_experts(token, block.routed_experts(), weights, selected, run_idle=True)
    assert torch.equal(direct, batched)
