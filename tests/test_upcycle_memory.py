"""Upcycling streams the checkpoint: its peak memory is bounded by a shard and a layer, not by the model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tiny_models import save_dense_model

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("upcycle_memory", REPO / "benchmarks" / "upcycle_memory.py")
upcycle_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upcycle_memory)

# What a run costs whatever the model's size (config, tokenizer, the model built on the meta device, allocator
# pools): about 10 MiB measured on the tiny test model.
SLACK_BYTES = 24 * 2**20


def test_peak_memory_is_one_shard_and_one_dense_layer_above_the_bare_imports(tmp_path):
    # 6 layers of hidden size 384 in float32: a 52 MB dense model in 3 shards, a 173 MB MoE with 4 experts.
    dense = save_dense_model(
        tmp_path / "dense", num_layers=6, hidden_size=384, intermediate_size=1536, max_shard_size="20MB"
    )
    result = upcycle_memory.measure_upcycle(dense, tmp_path / "moe", ["--num_experts", "4", "--max_shard_size", "40MB"])
    bound = result["largest_shard_bytes"] + result["dense_layer_bytes"] + SLACK_BYTES
    assert result["shards"] > 1 and (tmp_path / "moe" / "model.safetensors.index.json").is_file()
    assert result["output_bytes"] > 2 * bound  # big enough for the bound to tell streaming from loading
    assert result["peak_above_baseline"] <= bound, {k: round(v / 2**20, 1) for k, v in result.items()}
