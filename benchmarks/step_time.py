"""Time one training step (forward + backward + AdamW) of a dense model and of its upcycled MoE-LPR form.

Run by hand, not in CI; results are written down in benchmarks/README.md.

    python benchmarks/step_time.py --dense DENSE_DIR --moe MOE_DIR [--batch 4 --seq 256 --steps 3 --bf16]

Each model trains what its method trains: the dense model everything (full fine-tuning), the MoE model
its stage-1 set (new experts and routers) and its stage-2 set (routers only).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM

import moelpr  # noqa: F401  (registers the MoE model types)
from moelpr.models.moe import NEW_EXPERTS_NAME, ROUTER_NAME

TRAINABLE = {
    "full": None,
    "stage1": (ROUTER_NAME, NEW_EXPERTS_NAME),
    "stage2": (ROUTER_NAME,),
}


def time_steps(path: str, trainable: tuple[str, ...] | None, batch: int, seq: int, steps: int, dtype) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or any(f".{m}." in name for m in trainable))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "model": path,
        "trainable_params_M": round(sum(p.numel() for p in params) / 1e6, 2),
        "seconds_per_step": round(sum(times[1:]) / steps, 2),
        "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True)
    parser.add_argument("--moe", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for label, path, trainable in (
        ("dense full fine-tuning", args.dense, TRAINABLE["full"]),
        ("MoE-LPR stage 1", args.moe, TRAINABLE["stage1"]),
        ("MoE-LPR stage 2", args.moe, TRAINABLE["stage2"]),
    ):
        result = time_steps(path, trainable, args.batch, args.seq, args.steps, dtype)
        print(json.dumps({"run": label, "dtype": str(dtype), **result}))


if __name__ == "__main__":
    main()
