"""Check that an MoE block's training forward and backward never synchronise the host with the GPU.

    python benchmarks/sync_check.py --moe MOE_DIR [--json OUT.json]

Each MoE block of the model runs a training forward (router, losses as in a training step, grouped experts) and
its backward under ``torch.cuda.set_sync_debug_mode("error")``, which turns any synchronising CUDA call into an
error; the block's input is what the model gives it on a random batch. The whole model's step is also run once
under ``"warn"`` and the synchronising calls outside the blocks (transformers' own, the loss) are counted, for the
record. Without a CUDA device nothing can be checked this way, and the script says so (the CPU tests run the
grouped path on the meta device instead, where any read of a tensor's value fails: tests/test_grouped_experts.py).
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
from transformers import AutoModelForCausalLM

import moelpr  # noqa: F401  (registers the MoE model types)
from moelpr.models import routing


def block_inputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states each MoE block receives on ``input_ids``."""
    captured = []
    hooks = [b.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach())) for b in model.moe_blocks()]
    with torch.no_grad():
        model(input_ids=input_ids)
    for hook in hooks:
        hook.remove()
    return captured


def assert_block_syncs_nothing(block: torch.nn.Module, hidden: torch.Tensor, token_mask: torch.Tensor) -> None:
    """Forward (with the router losses of a training step) and backward of ``block`` under sync debug mode "error"."""
    context = routing.RoutingContext(
        token_mask=token_mask,
        lang_mask=token_mask.clone(),
        compute_losses=True,
        loss_weights=(0.01, 0.01),
        loss_scale=routing.LossScale(),
    )
    hidden = hidden.clone().requires_grad_(True)
    grad = torch.randn_like(hidden)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routing._current.context = context
        output = block(hidden)
        routing._current.context = None
        output.backward(grad)
    finally:
        routing._current.context = None
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def model_step_sync_warnings(model, input_ids: torch.Tensor) -> list[str]:
    """Synchronising calls of one whole training step (forward and backward), as warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(input_ids=input_ids, labels=input_ids).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        result = {"checked": False, "why": "no CUDA device: set_sync_debug_mode needs one (CPU: meta-device test)"}
    else:
        model = AutoModelForCausalLM.from_pretrained(args.moe, dtype=torch.bfloat16).cuda().train()
        for name, param in model.named_parameters():  # stage 1's trainable set
            param.requires_grad_(".router." in name or ".new_experts." in name)
        input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
        token_mask = torch.ones(input_ids.numel(), dtype=torch.bool, device="cuda")
        token_mask[: args.seq // 4] = False  # some padding, as the losses see it
        for block, hidden in zip(model.moe_blocks(), block_inputs(model, input_ids)):
            assert_block_syncs_nothing(block, hidden, token_mask)
        result = {
            "checked": True,
            "moe_blocks_without_sync": len(model.moe_blocks()),
            "whole_step_sync_sites": model_step_sync_warnings(model, input_ids),
            "gpu": torch.cuda.get_device_name(),
        }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
