"""Where one training step's CPU time goes: torch.profiler over one step (after a warm-up step), operators by self time.

    python benchmarks/profile_step.py --model DIR [--stage full|stage1|stage2] [--dtype bf16|float32]
        [--implementation loop|grouped|auto] [--batch 4 --seq 256] [--rows 15] [--threads N] [--by_shape]

``--stage full`` trains everything (the dense model's full fine-tuning), ``stage1`` / ``stage2`` MoE-LPR's sets.
``--threads``: torch's intra-op threads (default: torch's choice); comparing a profile at 1 thread with one at 2
shows which operators do not speed up with the second core. ``--by_shape``: one row per operator and input shapes.
"""

from __future__ import annotations

import argparse

import torch
from step_time import DTYPES, TRAINABLE, trainer_adamw  # noqa: E402  (benchmarks/ is the script's directory)
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

import moelpr  # noqa: F401  (registers the MoE model types)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--stage", choices=sorted(TRAINABLE), default="stage1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--implementation", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--by_shape", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {"moe_experts_implementation": args.implementation} if args.implementation else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], **fields).train()
    trainable = TRAINABLE[args.stage]
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or any(f".{m}." in name for m in trainable))
    optimizer = trainer_adamw([p for p in model.parameters() if p.requires_grad])
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as profiler:
        step()
    averages = profiler.key_averages(group_by_input_shape=args.by_shape)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
