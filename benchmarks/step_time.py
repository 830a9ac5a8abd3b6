"""Time one training step (forward + backward + AdamW) of a dense model and of its upcycled MoE-LPR form, side by side.

Run by hand (and, tiny, by the GPU suite's CPU form in CI); results are written down in benchmarks/README.md.

    python benchmarks/step_time.py --dense DENSE_DIR --moe MOE_DIR [--dtypes bf16,float32] [--batch 4 --seq 256]
        [--repeats 5] [--implementations loop,grouped] [--device cuda] [--json OUT.json]

Each model trains what its method trains: the dense model everything (full fine-tuning), the MoE model its stage-1
set (new experts and routers) and its stage-2 set (routers only), each with every expert implementation asked for.
All configurations (and dtypes) are timed in turn within each round, so that a change of machine load hits them
alike, and each MoE step is divided by the dense step of its own round; the first round warms up and is not
counted. Printed: per configuration the median seconds per step, the median ratio to dense and the ratios'
spread (min-max over rounds), tokens/s and, on CUDA, the peak memory a step allocates above what was resident
before it (activations, gradients, and in the first round the optimizer state; every model stays resident, so
absolute peaks would mix the configurations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

import moelpr  # noqa: F401  (registers the MoE model types)
from moelpr.models.moe import NEW_EXPERTS_NAME, ROUTER_NAME

TRAINABLE = {
    "full": None,
    "stage1": (ROUTER_NAME, NEW_EXPERTS_NAME),
    "stage2": (ROUTER_NAME,),
}
DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}


def trainer_adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer LLaMA-Factory's runs get: the Trainer's default ``optim`` is ``adamw_torch_fused``, one fused
    kernel per step on the CPU as on CUDA (the unfused loop costs a stage-1 step, whose trainable set is 1.8x the
    dense model's, about a quarter of its time in bf16)."""
    return torch.optim.AdamW(params, lr=1e-5, fused=True)


@dataclass
class Run:
    """One configuration: a model, what trains, how its experts run; its optimizer is made on first use."""

    label: str
    dtype: str
    model: torch.nn.Module
    trainable: tuple[str, ...] | None
    implementation: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # CUDA: the most a step allocated above what was resident when it began (all models)

    def step(self, input_ids: torch.Tensor, counted: bool) -> None:
        trainable_names = self.prepare()
        if self.optimizer is None:
            params = [p for name, p in self.model.named_parameters() if name in trainable_names]
            self.optimizer = trainer_adamw(params)
        cuda = input_ids.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        start = time.perf_counter()
        self.model(input_ids=input_ids, labels=input_ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated() - resident)
        if counted:
            self.seconds.append(time.perf_counter() - start)

    def prepare(self) -> set[str]:
        """Freeze as this configuration trains and set its expert implementation (the MoE model is shared)."""
        names = set()
        for name, param in self.model.named_parameters():
            train = self.trainable is None or any(f".{m}." in name for m in self.trainable)
            param.requires_grad_(train)
            if train:
                names.add(name)
        if self.implementation is not None:
            self.model.config.moe_experts_implementation = self.implementation
        return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", required=True)
    parser.add_argument("--moe", required=True)
    parser.add_argument("--dtypes", default="bf16,float32", help="comma-separated: bf16, float32")
    parser.add_argument("--implementations", default="loop,grouped", help="comma-separated: loop, grouped, auto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="counted rounds (after one warm-up round)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    runs: list[Run] = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        dense = AutoModelForCausalLM.from_pretrained(args.dense, dtype=dtype).to(device).train()
        moe = AutoModelForCausalLM.from_pretrained(args.moe, dtype=dtype).to(device).train()
        if args.gradient_checkpointing:
            for model in (dense, moe):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        runs.append(Run("dense full fine-tuning", dtype_name, dense, TRAINABLE["full"]))
        for stage in ("stage1", "stage2"):
            for implementation in args.implementations.split(","):
                label = f"MoE-LPR {stage}, {implementation}"
                runs.append(Run(label, dtype_name, moe, TRAINABLE[stage], implementation))
    vocab = runs[0].model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
    for round_index in range(args.repeats + 1):
        for run in runs:
            run.step(input_ids, counted=round_index > 0)

    results = []
    for run in runs:
        dense = next(r for r in runs if r.dtype == run.dtype and r.trainable is None)
        ratios = [s / d for s, d in zip(run.seconds, dense.seconds)]
        result = {
            "run": run.label,
            "dtype": run.dtype,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "rounds": len(run.seconds),
            "seconds_per_step": round(statistics.median(run.seconds), 3),
            "tokens_per_s": round(input_ids.numel() / statistics.median(run.seconds), 1),
            "ratio_to_dense": round(statistics.median(ratios), 3),
            "ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        }
        run.prepare()
        result["trainable_params_M"] = round(sum(p.numel() for p in run.model.parameters() if p.requires_grad) / 1e6, 2)
        if device.type == "cuda":
            result["step_peak_above_resident_GiB"] = round(run.peak_bytes / 2**30, 2)
        results.append(result)
        print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
