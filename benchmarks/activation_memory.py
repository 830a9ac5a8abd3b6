"""Peak memory of one training forward + backward per token, on the CPU: the activation factors of `moelpr estimate`.

    python benchmarks/activation_memory.py --model NAME=DENSE_DIR,MOE_DIR [--model ...] [--dtypes bf16]
        [--batches 1,3] [--seq 512] [--layers 8,4] [--runs full,stage1,stage2] [--checkpointing off,on]
        [--json OUT.jsonl]
    python benchmarks/activation_memory.py --fit OUT.jsonl     # per-token slopes, then the estimate's factors
    python benchmarks/activation_memory.py --check OUT.jsonl   # measured bytes per token against the estimate's
    python benchmarks/activation_memory.py --gpu_suite         # the estimate for the GPU suite's step_time runs

For every model, run (dense full fine-tuning on the dense model; MoE-LPR stage 1 and stage 2 on its upcycle),
gradient checkpointing off and on (reentrant, as LLaMA-Factory enables it), layer count (the model is loaded with
that many; default: all and half) and batch size, it measures the peak resident memory (RSS) of a forward +
backward above the RSS before it. The script runs itself again with glibc's mmap threshold fixed low
(``MALLOC_MMAP_THRESHOLD_``): every tensor larger than 16 KiB is then its own mapping, given back to the system when
it is freed, so the RSS follows the live tensors (torch has no caching allocator on the CPU; ``tracemalloc`` does not
see tensor memory). The peak is ``VmHWM`` after resetting it through ``/proc/self/clear_refs``. A warm-up pass
allocates the gradients and the kernels' caches; two measured passes follow, with the gradients still allocated
(zeroed in place), so a peak above the start is what the pass itself holds: saved activations and the backward's
transients. The larger of the two is kept.

Printed (and appended to ``--json``), one JSON line per measurement. benchmarks/README.md has the figures, how they
were read into ``moelpr.estimate``'s factors, and the estimate's error.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MMAP_THRESHOLD = 16384
RUNS = ("full", "stage1", "stage2")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_one(path: str, run: str, dtype_name: str, layers: int, batch: int, seq: int, checkpointing: bool) -> dict:
    """One measurement: the model loaded with ``layers`` layers, a warm-up pass, then the measured ones."""
    import torch
    from transformers import AutoModelForCausalLM

    import moelpr  # noqa: F401  (registers the MoE model types)
    from moelpr.models.moe import NEW_EXPERTS_NAME, ROUTER_NAME

    trainable = {"full": None, "stage1": (ROUTER_NAME, NEW_EXPERTS_NAME), "stage2": (ROUTER_NAME,)}[run]
    dtype = {"bf16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, num_hidden_layers=layers).train()
    model.config.use_cache = False
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or any(f".{m}." in name for m in trainable))
    if checkpointing:
        # What LLaMA-Factory does by default (use_reentrant_gc: true); the input embeddings' output must
        # require grad for reentrant checkpointing to back-propagate through frozen embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    step()  # allocates the gradients and the kernels' caches
    peaks = []
    for _ in range(2):
        for param in model.parameters():
            if param.grad is not None:
                param.grad.zero_()
        gc.collect()
        start = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        step()
        peaks.append((_rss_kib("VmHWM") - start) * 1024)
    return {
        "model": path,
        "run": run,
        "dtype": dtype_name,
        "layers": layers,
        "batch": batch,
        "seq": seq,
        "tokens": batch * seq,
        "checkpointing": checkpointing,
        "peak_bytes": max(peaks),
        "peaks": peaks,
    }


def _num_layers(path: str) -> int:
    return json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]


def fit(records: list[dict]) -> list[dict]:
    """Per (model, run, dtype, checkpointing): bytes per token of the whole model (slope over the batch sizes), of
    one layer (difference of the slopes at the two layer counts) and of the rest (embeddings, head, loss)."""
    groups: dict[tuple, dict[int, dict[int, int]]] = {}
    for r in records:
        key = (r["name"], r["run"], r["dtype"], r["checkpointing"])
        groups.setdefault(key, {}).setdefault(r["layers"], {})[r["tokens"]] = r["peak_bytes"]
    results = []
    for (name, run, dtype, checkpointing), by_layers in groups.items():
        slopes = {}
        for layers, by_tokens in by_layers.items():
            if len(by_tokens) > 1:
                (t0, p0), (t1, p1) = sorted(by_tokens.items())[0], sorted(by_tokens.items())[-1]
                slopes[layers] = (p1 - p0) / (t1 - t0)
        if len(slopes) < 2:
            continue  # not measured at two layer counts (yet)
        (l0, s0), (l1, s1) = sorted(slopes.items())[0], sorted(slopes.items())[-1]
        per_layer = (s1 - s0) / (l1 - l0)
        results.append(
            {
                "name": name,
                "run": run,
                "dtype": dtype,
                "checkpointing": checkpointing,
                "bytes_per_token": {str(k): round(v) for k, v in slopes.items()},
                "per_layer_bytes_per_token": round(per_layer),
                "rest_bytes_per_token": round(s1 - l1 * per_layer),
            }
        )
    return results


def _shape(path: str) -> dict:
    config = json.loads((Path(path) / "config.json").read_text())
    ffns = config.get("num_experts_per_tok", 1) if "moe_method" in config else 1
    return {"h": config["hidden_size"], "i": config["intermediate_size"], "vocab": config["vocab_size"], "ffns": ffns}


def factors(records: list[dict]) -> list[dict]:
    """The factors of ``moelpr.estimate`` from the per-layer and rest slopes, per dtype and run.

    A layer's bytes per token over the bytes of the dtype, ``attention * h + ffn * i * ffns``, least squares over the
    models of the smaller vocabulary (where the layers are most of the slope); with checkpointing, the layer's bytes
    over ``bytes * h``, averaged; the head's bytes per token and vocabulary entry from two models that differ only in
    their vocabulary (the difference of their rests), without checkpointing.
    """
    import numpy as np

    model_of = {(r["name"], r["run"]): r["model"] for r in records}
    slopes = fit(records)
    out = []
    for dtype in sorted({s["dtype"] for s in slopes}):
        element = 2 if dtype == "bf16" else 4
        for run in RUNS:
            rows = [s for s in slopes if s["dtype"] == dtype and s["run"] == run]
            shapes = {s["name"]: _shape(model_of[(s["name"], run)]) for s in rows}
            plain = [s for s in rows if not s["checkpointing"]]
            small = [s for s in plain if shapes[s["name"]]["vocab"] < 1000]
            if len(small) < 2:
                continue
            a = np.array([[shapes[s["name"]]["h"], shapes[s["name"]]["i"] * shapes[s["name"]]["ffns"]] for s in small])
            b = np.array([s["per_layer_bytes_per_token"] / element for s in small])
            (attention, ffn), *_ = np.linalg.lstsq(a, b, rcond=None)
            checkpointed = [
                s["per_layer_bytes_per_token"] / (element * shapes[s["name"]]["h"])
                for s in rows
                if s["checkpointing"] and shapes[s["name"]]["vocab"] < 1000
            ]
            heads = []
            for big in (s for s in plain if shapes[s["name"]]["vocab"] >= 1000):
                for low in small:
                    same = {k: shapes[low["name"]][k] for k in ("h", "i")} == {
                        k: shapes[big["name"]][k] for k in ("h", "i")
                    }
                    if same:
                        extra_vocab = shapes[big["name"]]["vocab"] - shapes[low["name"]]["vocab"]
                        heads.append((big["rest_bytes_per_token"] - low["rest_bytes_per_token"]) / extra_vocab)
            out.append(
                {
                    "dtype": dtype,
                    "run": run,
                    "attention": round(float(attention), 2),
                    "ffn": round(float(ffn), 2),
                    "checkpointed": [round(c, 2) for c in checkpointed],
                    "head_bytes_per_vocab": [round(h, 2) for h in heads],
                }
            )
    return out


def check(records: list[dict]) -> list[dict]:
    """Bytes per token measured (the slope over the batch sizes) against ``moelpr estimate``'s, for every model,
    run, dtype, checkpointing and layer count measured at two batch sizes or more."""
    import dataclasses

    from moelpr.estimate import Setup, activation_bytes_per_token, measure_shape, read_config, upcycled_config

    groups: dict[tuple, dict[int, int]] = {}
    for r in records:
        key = (r["name"], r["model"], r["run"], r["dtype"], r["checkpointing"], r["layers"])
        groups.setdefault(key, {})[r["tokens"]] = r["peak_bytes"]
    out = []
    for (name, path, run, dtype, checkpointing, layers), by_tokens in sorted(groups.items()):
        if len(by_tokens) < 2:
            continue
        (t0, p0), (t1, p1) = sorted(by_tokens.items())[0], sorted(by_tokens.items())[-1]
        stage = "review" if run == "stage2" else "post_pretrain"
        setup = Setup(stage=stage, gradient_checkpointing=checkpointing, dtype="fp32" if dtype == "float32" else dtype)
        config = read_config(path)
        config.num_hidden_layers = layers
        shape = measure_shape(upcycled_config(config), setup)
        if run == "full":
            shape = dataclasses.replace(shape, layers=[("full", 1.0, 1.0)] * layers, moe_layers=0)
        measured, estimated = (p1 - p0) / (t1 - t0), activation_bytes_per_token(shape, setup)
        out.append(
            {
                "name": name,
                "run": run,
                "dtype": dtype,
                "checkpointing": checkpointing,
                "layers": layers,
                "measured_bytes_per_token": round(measured),
                "estimated_bytes_per_token": round(estimated),
                "error": round(estimated / measured - 1, 3),
                f"measured_peak_at_{t1}_tokens_MiB": round(p1 / 2**20, 1),
                "estimated_MiB": round(estimated * t1 / 2**20, 1),
            }
        )
    return out


def gpu_suite_estimate(work_dir: Path) -> list[dict]:
    """``moelpr estimate``'s activations for the GPU suite's step_time.json runs (benchmarks/README.md): a random
    model of Qwen2.5-0.5B's shape, 4 experts top-2, bf16, 8 x 1024 tokens, no gradient checkpointing; with the
    gradients (bf16 there, the model is trained in bf16 with torch's AdamW) that a step's peak may also hold."""
    import dataclasses

    from random_models import SHAPES

    from moelpr.estimate import Setup, activation_bytes_per_token, measure_shape, read_config, upcycled_config

    family, fields = SHAPES["qwen2.5-0.5b"]
    fields = {("num_hidden_layers" if k == "num_layers" else k): v for k, v in fields.items()}
    config_file = work_dir / "qwen2.5-0.5b.json"
    config_file.write_text(json.dumps({"model_type": family, **fields}))
    out = []
    for run, stage in (("full", "review"), ("stage1", "post_pretrain"), ("stage2", "review")):
        setup = Setup(stage=stage, micro_batch=8, cutoff_len=1024, gradient_checkpointing=False)
        shape = measure_shape(upcycled_config(read_config(config_file)), setup)
        trained = shape.trained
        if run == "full":
            shape = dataclasses.replace(shape, layers=[("full", 1.0, 1.0)] * len(shape.layers), moe_layers=0)
            trained = shape.dense_total
        activations = activation_bytes_per_token(shape, setup) * 8 * 1024
        out.append(
            {
                "run": run,
                "activations_GiB": round(activations / 2**30, 2),
                "gradients_GiB": round(2 * trained / 2**30, 2),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="NAME=DENSE_DIR,MOE_DIR (repeatable)")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--batches", default="1,3")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--checkpointing", default="off,on")
    parser.add_argument("--layers", help="layer counts to load the models with, e.g. 8,4 (default: all and half)")
    parser.add_argument("--json", help="append the measurements to this file (JSON lines)")
    parser.add_argument("--fit", help="only fit the measurements of this JSON-lines file (slopes, then factors)")
    parser.add_argument("--check", help="only compare the measurements of this JSON-lines file with the estimate")
    parser.add_argument("--gpu_suite", action="store_true", help="only print the estimate for the GPU suite's steps")
    args = parser.parse_args()
    if args.gpu_suite:
        with tempfile.TemporaryDirectory() as work_dir:
            for result in gpu_suite_estimate(Path(work_dir)):
                print(json.dumps(result))
        return
    if args.check:
        records = [json.loads(line) for line in Path(args.check).read_text().splitlines() if line.strip()]
        for result in check(records):
            print(json.dumps(result))
        return
    if args.fit:
        records = [json.loads(line) for line in Path(args.fit).read_text().splitlines() if line.strip()]
        for result in fit(records) + factors(records):
            print(json.dumps(result))
        return
    for spec in args.model:
        name, _, dirs = spec.partition("=")
        dense, moe = dirs.split(",")
        for run in args.runs.split(","):
            path = dense if run == "full" else moe
            full_layers = _num_layers(path)
            layer_counts = [int(n) for n in args.layers.split(",")] if args.layers else [full_layers, full_layers // 2]
            for dtype in args.dtypes.split(","):
                for checkpointing in args.checkpointing.split(","):
                    for layers in layer_counts:
                        for batch in map(int, args.batches.split(",")):
                            one = {
                                "path": path,
                                "run": run,
                                "dtype_name": dtype,
                                "layers": layers,
                                "batch": batch,
                                "seq": args.seq,
                                "checkpointing": checkpointing == "on",
                            }
                            record = {"name": name, **measure_one(**one)}
                            print(json.dumps(record), flush=True)
                            if args.json:
                                with open(args.json, "a") as handle:
                                    handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": "0"}
        sys.exit(subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode)
    main()
