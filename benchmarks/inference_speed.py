"""Prefill and decode tokens/s of an upcycled MoE-LPR model against its dense original, side by side.

Run by hand, not in CI; results are written down in benchmarks/README.md.

    python benchmarks/inference_speed.py --dense DENSE_DIR --moe MOE_DIR [--bf16] [--repeats 5] [--device cuda]
        [--json OUT.json]

Prefill: one forward pass over a batch of random token blocks (no cache). Decode: greedy steps with the KV
cache, batch 1, a fixed number of new tokens after a short prompt (each step timed; the prompt's prefill not).
The two models are timed alternately (dense, MoE, dense, MoE, ...) so that a change of machine load hits both,
and the median of the repeats is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import moelpr  # noqa: F401  (registers the MoE model types)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def prefill_seconds(model, input_ids: torch.Tensor) -> float:
    _sync(input_ids.device)
    start = time.perf_counter()
    model(input_ids=input_ids)
    _sync(input_ids.device)
    return time.perf_counter() - start


@torch.inference_mode()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds per generated token: greedy steps with the KV cache, each step's forward pass timed, after the
    prompt's prefill (not timed). Timed directly rather than as two ``generate`` calls minus each other, whose
    difference goes negative when the model is tiny and the machine busy."""
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(prompt.device)
    return (time.perf_counter() - start) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True)
    parser.add_argument("--moe", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--implementation", default=None, help="the MoE model's moe_experts_implementation")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    moe_fields = {"moe_experts_implementation": args.implementation} if args.implementation else {}
    models = {
        "dense": AutoModelForCausalLM.from_pretrained(args.dense, dtype=dtype).to(device).eval(),
        "moe": AutoModelForCausalLM.from_pretrained(args.moe, dtype=dtype, **moe_fields).to(device).eval(),
    }
    generator = torch.Generator().manual_seed(0)
    vocab = models["dense"].config.vocab_size
    blocks = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=generator).to(device)
    for model in models.values():  # warm-up: first calls allocate and pick kernels
        prefill_seconds(model, blocks)
        decode_seconds(model, prompt, 4)
    prefill = {name: [] for name in models}
    decode = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            prefill[name].append(prefill_seconds(model, blocks))
            decode[name].append(decode_seconds(model, prompt, args.new_tokens))
    result = {
        "dtype": str(dtype),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "moe_experts_implementation": models["moe"].config.moe_experts_implementation,
    }
    for name in models:
        result[f"{name}_prefill_tokens_per_s"] = round(blocks.numel() / statistics.median(prefill[name]), 1)
        result[f"{name}_decode_tokens_per_s"] = round(1 / statistics.median(decode[name]), 2)
    for phase in ("prefill", "decode"):
        result[f"{phase}_ratio_moe_to_dense"] = round(
            result[f"moe_{phase}_tokens_per_s"] / result[f"dense_{phase}_tokens_per_s"], 3
        )
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
