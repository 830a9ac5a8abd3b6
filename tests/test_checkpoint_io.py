"""Streamed checkpoint reading and writing: what is read and written, shard names and sizes, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from moelpr.checkpoints.streaming import (
    CheckpointError,
    CheckpointReader,
    ShardedWriter,
    TensorSpec,
    parse_size,
    plan_shards,
    staged_directory,
)


def mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(32, 32, generator=generator),
        "a.bf16": torch.randn(8, 40, generator=generator).to(torch.bfloat16),
        "c.index": torch.arange(-5, 27, dtype=torch.int64),
        "d.mask": torch.rand(3, 5, generator=generator) > 0.5,
        "e.scalar": torch.tensor(2.5, dtype=torch.float16),
        "f.empty": torch.zeros(0, 4),
        "g.weight": torch.randn(64, 64, generator=generator),
    }


def write_all(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> ShardedWriter:
    layout = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = ShardedWriter(directory, layout, max_shard_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    return writer


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """With safetensors' own reader, the reference."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_writer_round_trips_every_dtype_into_indexed_shards(tmp_path):
    tensors = mixed_tensors()
    writer = write_all(tmp_path, tensors, max_shard_bytes=4096)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    count = len(writer.shards)
    assert count >= 3 and files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    back = read_all(tmp_path)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, file in index["weight_map"].items():
        assert name in load_file(tmp_path / file)
    # "g.weight" (16 KiB) is larger than a shard may be: it gets one of its own, the others stay under the limit.
    sizes = {file: sum(back[n].numel() * back[n].element_size() for n in load_file(tmp_path / file)) for file in files}
    assert writer.largest_shard_bytes == max(sizes.values()) == 64 * 64 * 4
    assert all(size <= 4096 for size in sorted(sizes.values())[:-1])


def test_shards_split_where_save_pretrained_splits(tmp_path):
    tensors = {f"t{i}": torch.zeros(n) for i, n in enumerate([300, 200, 500, 100, 100, 700, 50])}  # float32
    layout = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    reference = split_torch_state_dict_into_shards(tensors, max_shard_size=3000)
    assert [[spec.name for spec in shard] for shard in plan_shards(layout, 3000)] == [
        names for names in reference.filename_to_tensors.values()
    ]


def test_one_shard_is_named_like_an_unsharded_checkpoint(tmp_path):
    write_all(tmp_path, mixed_tensors(), max_shard_bytes=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(tmp_path / "model.safetensors")["g.weight"], mixed_tensors()["g.weight"])


def test_tensors_that_share_memory_are_written_as_copies(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tensors = {"whole": base, "view": base[2:8], "strided": base.view(3, 4).t()}
    back = read_all(write_all(tmp_path, tensors, max_shard_bytes=10**9).directory)
    assert all(torch.equal(back[name], tensor) for name, tensor in tensors.items())


def test_writer_accepts_only_the_layout_in_order(tmp_path):
    layout = [TensorSpec("a", (2, 3), torch.float32), TensorSpec("b", (4,), torch.bfloat16)]
    with pytest.raises(ValueError, match=r"expected a \[2, 3\] torch.float32, got b"):
        ShardedWriter(tmp_path, layout, 100).write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="expected a .* got a \\[3, 2\\]"):
        ShardedWriter(tmp_path, layout, 100).write("a", torch.zeros(3, 2))
    writer = ShardedWriter(tmp_path, layout, 100)
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected b \\[4\\] torch.bfloat16, got b \\[4\\] torch.float32"):
        writer.write("b", torch.zeros(4))
    writer.close()
    writer = ShardedWriter(tmp_path, layout, 100)
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="1 tensors of the layout were never written, from b"):
        writer.finish()
    writer.close()
    with pytest.raises(ValueError, match="appears twice"):
        ShardedWriter(tmp_path, layout * 2, 100)


@pytest.mark.parametrize("max_shard_size", ["5GB", "2KB"])
def test_reader_reads_save_pretrained_checkpoints_in_stored_order(tiny_llama_dir, tmp_path, max_shard_size):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    reference = read_all(tmp_path)
    with CheckpointReader(tmp_path) as reader:
        assert sorted(reader.names()) == sorted(reference)
        for name, tensor in reference.items():
            assert reader.spec(name) == TensorSpec(name, tuple(tensor.shape), tensor.dtype)
            assert torch.equal(reader.get(name), tensor)
    # Stored order: by shard, then by position in the file.
    order = []
    for path in sorted(tmp_path.glob("*.safetensors")):
        header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
        header.pop("__metadata__", None)
        order += sorted(header, key=lambda name: header[name]["data_offsets"][0])
    assert CheckpointReader(tmp_path).names() == order


def test_reader_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(CheckpointError, match="has no model.safetensors or model.safetensors.index.json"):
        CheckpointReader(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds PyTorch .bin weights; only safetensors"):
        CheckpointReader(tmp_path)

    save_file({"w": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, listed in .* is missing"):
        CheckpointReader(tmp_path)
    save_file({"u": torch.zeros(2)}, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="v \\(and 0 more\\) listed in .* is not in its shard"):
        CheckpointReader(tmp_path)

    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        CheckpointReader(single)
    save_file({"w": torch.arange(100.0)}, single / "model.safetensors")
    data = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match="is truncated \\(in the data of w\\)"):
        CheckpointReader(single).get("w")


def test_sizes():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5KB") == 1500
    assert parse_size("1024") == parse_size(1024) == 1024
    for bad in ("lots", "GB", "0", "-3MB", 0):
        with pytest.raises(CheckpointError):
            parse_size(bad)


def test_staged_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "half.bin").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()  # an empty directory may be the target
    with staged_directory(target) as staging:
        (staging / "whole.bin").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "whole.bin").read_text() == "x"
