"""The grouped expert computation (one grouped GEMM per projection for all experts of a layer) against the loop
over experts: same outputs, same gradients, same freeze rules, for every family and both methods."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from tiny_models import FAMILY_FIELDS
from transformers.models.llama.modeling_llama import LlamaMLP

from moelpr.errors import MoELPRUserError
from moelpr.llamafactory_plugin.model import setup_moelpr_tuning
from moelpr.models import MOE_FAMILIES, LlamaMoELPRConfig
from moelpr.models.configuration import CT, LPR
from moelpr.models.expert_dispatch import auto_groups_experts, run_experts, uses_grouped_experts
from moelpr.models.moe import MoELPRSparseBlock
from moelpr.models.routing import route

VOCAB = 96
# (method, stage): MoE-LPR's two stages and MoE-CT's one.
STAGES = [(LPR, "post_pretrain"), (LPR, "review"), (CT, "post_pretrain")]


def _model(family: str, method: str, top_k: int, implementation: str, dtype: torch.dtype = torch.float32):
    """A tiny random MoE model of ``family`` with different experts (not upcycled copies, which would hide a mix-up),
    per-layer expert counts and one dense layer, seeded so that every call builds the same weights."""
    config_class, model_class = MOE_FAMILIES[family]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        max_position_embeddings=64,
        pad_token_id=0,
        moe_method=method,
        moe_layers=[0, 2],
        num_experts=[3, 2],
        num_experts_per_tok=top_k,
        router_aux_loss_coef=0.1,
        lpr_loss_coef=0.5 if method == LPR else 0.0,
        moe_experts_implementation=implementation,
        **FAMILY_FIELDS.get(family, {}),
    )
    torch.manual_seed(0)
    model = model_class(config).to(dtype)
    with torch.no_grad():  # routers that spread tokens over every expert
        for block in model.moe_blocks():
            block.router.weight.normal_(std=0.5)
    return model


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, 7:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    lang_mask = torch.zeros_like(input_ids)
    lang_mask[0] = 1
    lang_mask[2, :5] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "lang_mask": lang_mask}


def _step(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(**batch, output_router_logits=True)
    output.loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    return output.logits.detach(), output.loss.detach(), grads


def _uses_grouped(model, batch) -> list[bool]:
    tokens = torch.zeros(batch["input_ids"].numel(), model.config.hidden_size, dtype=model.dtype)
    experts = [b.routed_experts() for b in model.moe_blocks()]
    implementation = model.config.moe_experts_implementation
    return [uses_grouped_experts(implementation, e, tokens) for e in experts]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(("method", "stage"), STAGES)
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_grouped_matches_loop_and_keeps_the_freeze_rules(family, method, stage, top_k):
    batch = _batch()
    loop, grouped = _model(family, method, top_k, "loop"), _model(family, method, top_k, "grouped")
    assert _uses_grouped(loop, batch) == [False, False] and _uses_grouped(grouped, batch) == [True, True]
    for model in (loop, grouped):
        setup_moelpr_tuning(model, stage, upcast_trainable=False)

    want_logits, want_loss, want_grads = _step(loop, batch)
    logits, loss, grads = _step(grouped, batch)
    torch.testing.assert_close(logits, want_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    # Within 1e-6 of the gradients' scale (a few, like the fusion bias's, are small differences of large terms).
    scale = max(float(g.abs().max()) for g in want_grads.values() if g is not None)
    for name, want in want_grads.items():
        assert (grads[name] is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(grads[name], want, rtol=1e-6, atol=1e-6 * scale, msg=name)

    # Training with the grouped path: every frozen tensor (expert 0 of MoE-LPR, the frozen FFN of MoE-CT, attention,
    # norms, embeddings) bit for bit, and every trainable one moved.
    before = {name: param.detach().clone() for name, param in grouped.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in grouped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _step(grouped, batch)
        optimizer.step()
    for name, param in grouped.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    frozen_expert = "original_expert"
    assert any(frozen_expert in name and not p.requires_grad for name, p in grouped.named_parameters())


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30))


@pytest.mark.parametrize("method", [LPR, CT])
@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_grouped_bf16_is_within_bf16_rounding_of_the_loop(family, method):
    """In bf16 the two paths round at different places (the grouped one computes gate and up in one GEMM); against a
    float32 reference, the grouped path's error must be of the size of the loop's own rounding error."""
    batch = _batch()
    reference_logits, _, reference_grads = _step(_model(family, method, 2, "loop"), batch)
    results = {impl: _step(_model(family, method, 2, impl, torch.bfloat16), batch) for impl in ("loop", "grouped")}
    loop_error = _relative_error(results["loop"][0], reference_logits)
    assert _relative_error(results["grouped"][0], reference_logits) <= 2 * loop_error + 1e-3
    for name, reference in reference_grads.items():
        if reference is None or not reference.any():
            continue
        loop_error = _relative_error(results["loop"][2][name], reference)
        grouped_error = _relative_error(results["grouped"][2][name], reference)
        assert grouped_error <= 2 * loop_error + 2e-3, (name, grouped_error, loop_error)


def _llama_config(implementation: str = "auto", top_k: int = 2, **config_fields) -> LlamaMoELPRConfig:
    return LlamaMoELPRConfig(
        hidden_size=32,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=top_k,
        moe_experts_implementation=implementation,
        **config_fields,
    )


def _llama_block(implementation: str, top_k: int = 2, **config_fields) -> MoELPRSparseBlock:
    config = _llama_config(implementation, top_k, **config_fields)
    torch.manual_seed(0)
    block = MoELPRSparseBlock(config, 4, lambda: LlamaMLP(config))
    with torch.no_grad():
        block.router.weight.normal_(std=1.0)
    return block


def test_grouped_under_autocast_matches_the_loop():
    """Mixed precision as the trainer runs it without DeepSpeed: float32 weights, bf16 autocast."""
    tokens = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    results = {}
    for implementation in ("loop", "grouped"):
        block = _llama_block(implementation)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert uses_grouped_experts(implementation, block.routed_experts(), tokens.reshape(-1, 32)) == (
                implementation == "grouped"
            )
            output = block(tokens)
        output.float().square().sum().backward()
        results[implementation] = output, [p.grad for p in block.parameters()]
    torch.testing.assert_close(results["grouped"][0], results["loop"][0])
    for got, want in zip(results["grouped"][1], results["loop"][1]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * float(want.abs().max()))


def test_grouped_path_reads_no_tensor_value_on_the_host():
    """On the meta device every tensor read on the host (``.item()``, ``.tolist()``, data-dependent shapes) fails,
    so the grouped forward and backward running there shows they need no host-device sync. (The GPU check,
    ``torch.cuda.set_sync_debug_mode("error")``, is in benchmarks/gpu_suite.sh; no GPU here.)"""
    block = _llama_block("grouped").to(device="meta", dtype=torch.bfloat16)
    tokens = torch.empty(9, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    _, weights, selected = route(block.router(tokens), 2)
    output = run_experts(tokens, block.routed_experts(), weights, selected, run_idle=True, implementation="grouped")
    output.sum().backward()
    assert tokens.grad.shape == tokens.shape and block.new_experts[0].down_proj.weight.grad.is_meta
    loop = _llama_block("loop").to(device="meta", dtype=torch.bfloat16)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the loop's bincount().tolist() is such a read
        run_experts(tokens, loop.routed_experts(), weights, selected, run_idle=True, implementation="loop")


def test_auto_decodes_one_token_through_its_experts_even_where_it_would_group(monkeypatch):
    """Where ``"auto"`` groups (CUDA in bf16), a single decoded token still calls its top-k experts directly: on an
    H200 that decoded at 0.74x the dense model's speed, the grouped path at 0.43x (benchmarks/README.md).
    ``"grouped"`` asked for by name still groups it."""
    from moelpr.models import expert_dispatch

    block = _llama_block("auto")
    token = torch.randn(1, 32)
    _, weights, selected = route(block.router(token), 2)
    grouped_calls = []
    grouped_ffn = expert_dispatch._grouped_ffn
    monkeypatch.setattr(expert_dispatch, "uses_grouped_experts", lambda implementation, experts, tokens: True)
    monkeypatch.setattr(expert_dispatch, "_grouped_ffn", lambda *args: grouped_calls.append(1) or grouped_ffn(*args))
    auto = run_experts(token, block.routed_experts(), weights, selected, run_idle=False, implementation="auto")
    assert not grouped_calls
    loop = run_experts(token, block.routed_experts(), weights, selected, run_idle=False, implementation="loop")
    assert torch.equal(auto, loop)
    grouped = run_experts(token, block.routed_experts(), weights, selected, run_idle=False, implementation="grouped")
    assert grouped_calls and torch.allclose(grouped, loop, atol=1e-6)


def test_experts_that_cannot_be_grouped_run_the_loop_on_auto_and_refuse_grouped():
    tokens = torch.randn(5, 32)
    with_bias = _llama_block("auto", mlp_bias=True)
    assert not uses_grouped_experts("auto", with_bias.routed_experts(), tokens)
    # On the CPU the loop is faster.
    assert not uses_grouped_experts("auto", _llama_block("auto").routed_experts(), tokens)
    assert uses_grouped_experts("grouped", _llama_block("auto").routed_experts(), tokens)
    with pytest.raises(ValueError, match="moe_experts_implementation='grouped' needs bias-free"):
        uses_grouped_experts("grouped", with_bias.routed_experts(), tokens)


@pytest.mark.parametrize(
    ("device_type", "capability", "dtype", "groups"),
    [
        ("cuda", (8, 0), torch.bfloat16, True),  # A100
        ("cuda", (8, 9), torch.bfloat16, True),  # L4, RTX 40
        ("cuda", (9, 0), torch.bfloat16, True),  # H100, H200
        # Blackwell: non-zero weight gradients for empty groups (pytorch/pytorch#172439), so new experts that got
        # no token would move.
        ("cuda", (10, 0), torch.bfloat16, False),
        ("cuda", (12, 0), torch.bfloat16, False),
        ("cuda", (7, 5), torch.bfloat16, False),  # before the grouped GEMM kernels
        ("cuda", None, torch.bfloat16, False),  # ROCm: no NVIDIA compute capability
        ("cuda", (9, 0), torch.float32, False),
        ("cuda", (9, 0), torch.float16, False),
        ("cpu", None, torch.bfloat16, False),
    ],
)
def test_auto_groups_only_in_bf16_on_compute_capabilities_where_empty_groups_get_zero_gradients(
    device_type, capability, dtype, groups
):
    assert auto_groups_experts(device_type, capability, dtype) is groups


def test_grouped_in_a_dtype_the_grouped_gemm_cannot_compute_in_is_refused_in_one_line():
    block = _llama_block("grouped").double()
    with pytest.raises(MoELPRUserError) as refused:
        block(torch.randn(1, 5, 32, dtype=torch.float64))
    assert str(refused.value) == (
        "moe_experts_implementation='grouped' computes in float32, bfloat16, float16 (torch._grouped_mm), not "
        "float64; use 'auto' or 'loop'."
    )
    # 'auto' runs such experts through the loop.
    block.config.moe_experts_implementation = "auto"
    assert block(torch.randn(1, 5, 32, dtype=torch.float64)).dtype == torch.float64


def test_the_experts_implementation_set_on_a_built_model_takes_effect(monkeypatch):
    """The blocks read ``moe_experts_implementation`` from the model's config at every forward, so setting it on a
    built model switches every MoE layer (benchmarks/step_time.py shares one model between implementations), and a
    value the config would have refused is refused at the next forward."""
    from moelpr.models import expert_dispatch

    grouped_calls = []
    grouped_ffn = expert_dispatch._grouped_ffn
    monkeypatch.setattr(expert_dispatch, "_grouped_ffn", lambda *args: grouped_calls.append(1) or grouped_ffn(*args))
    model, batch = _model("llama", LPR, 2, "loop"), _batch()
    loop_logits, _, _ = _step(model, batch)
    assert grouped_calls == []
    model.config.moe_experts_implementation = "grouped"
    grouped_logits, _, _ = _step(model, batch)
    assert len(grouped_calls) == 2  # one per MoE layer
    torch.testing.assert_close(grouped_logits, loop_logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="moe_experts_implementation must be one of"):
        model.config.moe_experts_implementation = "fast"
        model(**batch)


def test_unknown_experts_implementation_is_refused():
    config_class, _ = MOE_FAMILIES["llama"]
    with pytest.raises(StrictDataclassClassValidationError, match="moe_experts_implementation must be one of"):
        config_class(num_hidden_layers=2, moe_experts_implementation="fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_slot_gather_is_the_broadcast_then_permutation_it_replaces(dtype, top_k):
    """The dispatch's one gather against what autograd does with the k copies of every token, indexed: the same
    rows forward and, bit for bit, the same token gradient (a sum over each token's slots) backward."""
    from moelpr.models.expert_dispatch import _GatherSlots, _slot_order

    torch.manual_seed(top_k)
    tokens = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    probs = torch.rand(37, 5).softmax(dim=-1)
    weights, selected = probs.topk(top_k, dim=-1)
    order, inverse, _, _ = _slot_order(weights, selected)
    upstream = torch.randn(37 * top_k, 16, dtype=dtype)

    gathered = _GatherSlots.apply(tokens, torch.div(order, top_k, rounding_mode="floor"), inverse, top_k)
    (gathered * upstream).sum().backward()
    reference_tokens = tokens.detach().clone().requires_grad_()
    reference = reference_tokens.unsqueeze(1).expand(37, top_k, 16).reshape(-1, 16)[order]
    (reference * upstream).sum().backward()
    assert torch.equal(gathered, reference)
    assert torch.equal(tokens.grad, reference_tokens.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_slot_sum_is_the_permutation_then_slot_sum_it_replaces(dtype, top_k):
    """The combine's gather-and-add against autograd's indexing and slicing of the same rows: the same outputs and,
    bit for bit, the same gradient of the expert-ordered rows (one gather instead of zero-filled slot gradients)."""
    from moelpr.models.expert_dispatch import _slot_order, _SumSlots

    torch.manual_seed(top_k)
    probs = torch.rand(37, 5).softmax(dim=-1)
    weights, selected = probs.topk(top_k, dim=-1)
    order, inverse, _, _ = _slot_order(weights, selected)
    sorted_out = torch.randn(37 * top_k, 16, dtype=dtype, requires_grad=True)
    upstream = torch.randn(37, 16, dtype=dtype)

    summed = _SumSlots.apply(sorted_out, inverse, torch.div(order, top_k, rounding_mode="floor"), top_k)
    (summed * upstream).sum().backward()
    reference_rows = sorted_out.detach().clone().requires_grad_()
    slots = reference_rows[inverse].view(37, top_k, 16)
    reference = slots[:, 0]
    for slot in range(1, top_k):
        reference = reference + slots[:, slot]
    (reference * upstream).sum().backward()
    assert torch.equal(summed, reference)
    assert torch.equal(sorted_out.grad, reference_rows.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_loop_pads_bf16_expert_rows_to_repeating_counts_and_drops_the_padding(dtype, monkeypatch):
    """On the CPU in bf16 each expert's rows are padded to a multiple of CPU_EXPERT_ROWS_MULTIPLE (so oneDNN reuses
    its kernels); the outputs and the gradients of the tokens, the router and the experts are the unpadded run's
    within bf16 rounding, and nothing of the padding reaches them. float32 (MKL) runs the rows as they are."""
    from moelpr.models import expert_dispatch

    torch.manual_seed(0)
    config = _llama_config()
    block = MoELPRSparseBlock(config, 4, lambda: LlamaMLP(config))
    block = block.to(dtype).train()
    with torch.no_grad():
        for expert in block.new_experts:
            expert.down_proj.weight.mul_(1.5)
        block.router.weight.normal_(std=0.5)
    hidden = torch.randn(2, 70, 32, dtype=dtype)  # 140 tokens x 2 slots: about 70 rows per expert

    def run(multiple: int) -> tuple[list[int], torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(expert_dispatch, "CPU_EXPERT_ROWS_MULTIPLE", multiple)
        rows = []
        hooks = [e.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0])) for e in block.routed_experts()]
        block.zero_grad(set_to_none=True)
        tokens = hidden.clone().requires_grad_()
        output = block(tokens)
        (output.float() * torch.linspace(-1, 1, 32)).sum().backward()
        for hook in hooks:
            hook.remove()
        grads = {name: p.grad.float() for name, p in block.named_parameters()} | {"tokens": tokens.grad.float()}
        return rows, output.float(), grads

    rows, output, grads = run(32)
    reference_rows, reference, reference_grads = run(1)
    assert sum(reference_rows) == 140 * 2 and all(count >= 32 for count in reference_rows)
    if dtype == torch.bfloat16:
        assert all(count % 32 == 0 for count in rows) and rows != reference_rows
        tolerance = {"atol": 2e-2, "rtol": 2e-2}
    else:
        assert rows == reference_rows
        tolerance = {"atol": 0.0, "rtol": 0.0}
    torch.testing.assert_close(output, reference, **tolerance)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, **tolerance, msg=name)
