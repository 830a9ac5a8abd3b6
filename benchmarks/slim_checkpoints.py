"""Bytes on disk and load time of whole and slim MoE-LPR checkpoints, on a random model of a real model's shape.

Run by hand (results in benchmarks/README.md):

    python benchmarks/slim_checkpoints.py --work_dir /tmp/slim-bench [--shape smollm2]

Makes a random dense model of the shape, upcycles it whole and slim (4 experts, top-2), then writes each stage's
output both ways: the stage's trainable tensors (the plugin's freeze rules) get new values, as training would
give them; a whole save writes every tensor, a slim one those tensors and a reference. Then loads the whole and
the slim stage-2 output (a chain of four directories) in fresh processes, timed, and checks they are equal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

SHAPES = {
    "smollm2": {"num_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
    "1b": {"num_layers": 16, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
}

_LOAD = r"""
import json, sys, time, torch
start = time.perf_counter()
from transformers import AutoModelForCausalLM
imported = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
done = time.perf_counter()
digest = sum(float(t.double().sum()) for t in model.state_dict().values())
print(json.dumps({"load_s": done - imported, "checksum": digest}))
"""


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed_load(path: Path, repeats: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _LOAD, str(path)], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return sorted(r["load_s"] for r in runs)[len(runs) // 2], runs[0]["checksum"]


def main() -> None:
    from test_slim_checkpoints import save_stage
    from tiny_models import save_dense_model

    from moelpr.upcycling.settings import UpcycleSettings
    from moelpr.upcycling.upcycle import upcycle

    parser = argparse.ArgumentParser()
    parser.add_argument("--work_dir", type=Path, required=True)
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    dense = save_dense_model(work / "dense", "llama", dtype=torch.float32, **SHAPES[args.shape])
    whole = upcycle(dense, work / "upcycled_whole", UpcycleSettings(num_experts=4, top_k=2))
    slim = upcycle(dense, work / "upcycled_slim", UpcycleSettings(num_experts=4, top_k=2, slim=True))
    sizes = {"dense": directory_bytes(dense), "upcycle": (directory_bytes(whole), directory_bytes(slim))}
    for stage, seed in (("post_pretrain", 1), ("review", 2)):
        whole, slim = save_stage(whole, slim, work, stage, seed)
        sizes[stage] = (directory_bytes(whole), directory_bytes(slim))
    print(json.dumps({"bytes (whole, slim)": sizes}, indent=1))
    whole_s, whole_sum = timed_load(whole, args.repeats)
    slim_s, slim_sum = timed_load(slim, args.repeats)
    print(f"load stage 2, median of {args.repeats}: whole {whole_s:.2f} s, slim {slim_s:.2f} s; "
          f"same checksum: {whole_sum == slim_sum}")


if __name__ == "__main__":
    main()
