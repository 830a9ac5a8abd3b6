"""Peak memory of `moelpr upcycle` against the size of what it writes.

Run by hand, not in CI (tests/test_upcycle_memory.py runs the same measurement on a small model); results are
written down in benchmarks/README.md.

    python benchmarks/upcycle_memory.py --model_path DENSE_DIR [--num_experts 4 --max_shard_size 5GB]
    python benchmarks/upcycle_memory.py --random_model DIR --hidden_size 2048 ... --dtype bfloat16   # makes DIR first
    python benchmarks/upcycle_memory.py --model_path DENSE_DIR --module_file OLD_UPCYCLING.py    # another version

The upcycling runs in a fresh Python process (Linux). Its baseline is the RSS once the upcycling module and the
transformers classes it uses are imported ("bare imports"), where the peak RSS is reset; its peak is the peak RSS
(``ru_maxrss``) when the upcycling is done. ``--module_file`` measures another version of the upcycler: any Python
file whose ``main(argv)`` takes the ``moelpr upcycle`` arguments.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moelpr.checkpoints.streaming import CheckpointReader

# The measured process. The transformers names are those either version of the upcycler imports, resolved
# here so that their import counts in the baseline. Imports pass through a higher RSS than they end at, so the
# peak is reset to the current RSS before the upcycling starts (Linux: /proc/self/clear_refs).
_CHILD = r"""
import gc, importlib.util, json, resource, sys, time

def max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

module_file, argv = sys.argv[1], sys.argv[2:]
if module_file:
    spec = importlib.util.spec_from_file_location("upcycling_under_test", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
else:
    import moelpr.cli.upcycle as module
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

gc.collect()
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # peak RSS := current RSS
baseline = max_rss()
start = time.perf_counter()
status = module.main(argv)
print(json.dumps({"status": status, "baseline": baseline, "peak": max_rss(), "seconds": time.perf_counter() - start}))
"""


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def layer_bytes(model_dir: Path, layer: int = 0) -> int:
    """Bytes of the tensors of one decoder layer (``model.layers.{layer}.*``) in a checkpoint."""
    with CheckpointReader(model_dir) as reader:
        return sum(reader.spec(name).nbytes for name in reader.names() if name.startswith(f"model.layers.{layer}."))


def measure_upcycle(
    model_path: Path, output_path: Path, upcycle_args: list[str], module_file: Path | None = None
) -> dict:
    """Upcycle ``model_path`` into ``output_path`` in a fresh process; its memory and what it wrote, in bytes."""
    argv = ["--model_path", str(model_path), "--output_path", str(output_path), *upcycle_args]
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(module_file or ""), *argv], capture_output=True, text=True, check=False
    )
    if run.returncode != 0 or not run.stdout.strip():
        raise RuntimeError(f"upcycling failed:\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if result["status"] != 0:
        raise RuntimeError(f"upcycling refused:\n{run.stderr[-3000:]}")
    shards = [path.stat().st_size for path in weight_files(output_path)]
    return {
        "baseline": result["baseline"],
        "peak": result["peak"],
        "peak_above_baseline": result["peak"] - result["baseline"],
        "seconds": round(result["seconds"], 1),
        "output_bytes": sum(shards),
        "shards": len(shards),
        "largest_shard_bytes": max(shards),
        "dense_bytes": sum(path.stat().st_size for path in weight_files(model_path)),
        "dense_layer_bytes": layer_bytes(model_path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, help="dense checkpoint to upcycle")
    parser.add_argument("--random_model", type=Path, help="make a random LLaMA here first (sizes below), measure it")
    parser.add_argument("--hidden_size", type=int, default=2048)
    parser.add_argument("--intermediate_size", type=int, default=5632)
    parser.add_argument("--num_layers", type=int, default=22)
    parser.add_argument("--num_heads", type=int, default=32)
    parser.add_argument("--num_kv_heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--module_file", type=Path, help="another upcycler's source file (e.g. an older version)")
    parser.add_argument("--output_path", type=Path, help="where the MoE checkpoint goes (default: a temporary dir)")
    args, upcycle_args = parser.parse_known_args()
    if args.random_model:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import save_dense_model

        if not (args.random_model / "config.json").is_file():
            save_dense_model(
                args.random_model, num_layers=args.num_layers, dtype=getattr(torch, args.dtype),
                hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads, vocab_size=args.vocab_size,
            )
        args.model_path = args.random_model
    if args.model_path is None:
        parser.error("give --model_path or --random_model")
    with tempfile.TemporaryDirectory(dir=args.output_path.parent if args.output_path else None) as scratch:
        output_path = args.output_path or Path(scratch) / "moe"
        result = measure_upcycle(args.model_path, output_path, upcycle_args, args.module_file)
    gib = {k: round(v / 2**30, 3) for k, v in result.items() if k.endswith(("bytes", "baseline", "peak"))}
    print(json.dumps({"model": str(args.model_path), "args": upcycle_args,
                      "version": str(args.module_file or "moelpr.cli.upcycle"), **result, "GiB": gib}))


if __name__ == "__main__":
    main()
