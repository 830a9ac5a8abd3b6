"""Slim checkpoints (docs/checkpoints.md): each stage saves what it trained plus a reference to its base, and every
loader gives bit for bit the model the whole checkpoint gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from llamafactory_cli import CLI, train
from safetensors.torch import load_file, save_file

from moelpr.checkpoints.fingerprint import CACHE_ENV, content_fingerprint, sampled_fingerprint
from moelpr.checkpoints.merge import merge
from moelpr.checkpoints.slim import MOE_BASE, REFERENCE_NAME, ComposedCheckpoint, SlimCheckpointError, write_reference
from moelpr.checkpoints.streaming import CheckpointReader, ShardedWriter, TensorSpec
from moelpr.upcycling.settings import UpcycleSettings
from moelpr.upcycling.upcycle import upcycle

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")

# Run in a fresh process, without importing moelpr (the startup hook registers the model types): loads pairs of
# checkpoints with a dtype and a device map and says which tensors differ.
COMPARE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "moelpr" not in sys.modules
report = {}
for whole, slim in json.loads(sys.argv[1]):
    kwargs = {"dtype": torch.bfloat16, "device_map": "cpu"}
    a = AutoModelForCausalLM.from_pretrained(whole, **kwargs).state_dict()
    b = AutoModelForCausalLM.from_pretrained(slim, **kwargs).state_dict()
    differ = [k for k in a if k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    # Expert copies must not share memory (tied embeddings do, in both).
    storages = [len({t.untyped_storage().data_ptr() for t in m.values()}) for m in (a, b)]
    differ += ["shared storage"] if storages[0] != storages[1] else []
    report[slim] = sorted(differ + [k for k in b if k not in a]) or len(a)
print(json.dumps(report))
"""


def compare_in_fresh_process(pairs: list[tuple[Path, Path]]) -> dict[str, list[str] | int]:
    run = subprocess.run(
        [sys.executable, "-c", COMPARE, json.dumps([[str(a), str(b)] for a, b in pairs])],
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def load_in_fresh_process(path: Path) -> subprocess.CompletedProcess:
    probe = "import sys; from transformers import AutoModelForCausalLM as M; M.from_pretrained(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", probe, str(path)], check=False, capture_output=True, text=True)


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with ComposedCheckpoint(model_dir) as checkpoint:
        return {name: checkpoint.get(name) for name in checkpoint.names()}


def save_stage(base_whole: Path, base_slim: Path, out: Path, stage: str, seed: int) -> tuple[Path, Path]:
    """What a training stage saves, made without training: the stage's trainable tensors (the plugin's rules) get
    new values; saved whole from the whole base, and slim (those tensors and a reference) over the slim base."""
    from transformers import AutoModelForCausalLM

    from moelpr.llamafactory_plugin.model import trainable_parameter_names

    model = AutoModelForCausalLM.from_pretrained(base_whole)
    trained = trainable_parameter_names(model, stage, train_embeddings=model.config.moe_method == "ct")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trained:
                param.add_(torch.randn(param.shape, generator=generator))
    whole, slim = out / f"{stage}_whole", out / f"{stage}_slim"
    model.save_pretrained(whole)
    model.save_pretrained(slim, state_dict={k: v for k, v in model.state_dict().items() if k in trained})
    write_reference(slim, base_slim, MOE_BASE)
    return whole, slim


@pytest.fixture(scope="module")
def chains(tiny_dense_dir, tmp_path_factory) -> dict[tuple[str, str], dict[str, Path]]:
    """Per family and method: the upcycled model and the last stage, whole and as a slim chain down to the dense
    model (MoE-LPR: stage 2 -> stage 1 -> slim upcycle -> dense; MoE-CT: its stage -> slim upcycle -> dense)."""
    made = {}
    for family in FAMILIES:
        for method in ("moe_lpr", "moe_ct"):
            root = tmp_path_factory.mktemp(f"{family}_{method}")
            dense = shutil.copytree(tiny_dense_dir(family), root / "dense")
            settings = UpcycleSettings(moe_layers="0,2", method=method)
            paths = {"dense": dense, "upcycled_whole": upcycle(dense, root / "upcycled_whole", settings)}
            paths["upcycled_slim"] = upcycle(dense, root / "upcycled_slim", replace(settings, slim=True))
            whole, slim = save_stage(paths["upcycled_whole"], paths["upcycled_slim"], root, "post_pretrain", 1)
            if method == "moe_lpr":
                whole, slim = save_stage(whole, slim, root, "review", 2)
            paths["last_whole"], paths["last_slim"] = whole, slim
            made[family, method] = paths
    return made


def test_slim_upcycle_holds_routers_only_and_loads_as_the_whole_upcycle(chains):
    for (family, method), paths in chains.items():
        stored = load_file(paths["upcycled_slim"] / "model.safetensors")
        assert stored and all(".mlp.router." in k or ".mlp.fusion." in k for k in stored), (family, method)
        whole, slim = tensors(paths["upcycled_whole"]), tensors(paths["upcycled_slim"])
        assert list(whole) == list(slim)  # the upcycler's order
        assert all(whole[k].dtype == slim[k].dtype and torch.equal(whole[k], slim[k]) for k in whole)


def test_slim_chains_load_in_a_fresh_process_as_the_whole_checkpoints(chains):
    pairs = [(p["last_whole"], p["last_slim"]) for p in chains.values()]
    pairs += [(p["upcycled_whole"], p["upcycled_slim"]) for p in chains.values()]
    report = compare_in_fresh_process(pairs)
    assert all(isinstance(result, int) and result > 0 for result in report.values()), report


def test_merge_writes_the_whole_checkpoint(chains, tmp_path):
    for (family, method), paths in chains.items():
        merged = merge(paths["last_slim"], tmp_path / f"{family}_{method}")
        assert not (merged / REFERENCE_NAME).exists() and (merged / "config.json").is_file()
        expected, got = load_file(paths["last_whole"] / "model.safetensors"), load_file(merged / "model.safetensors")
        assert expected.keys() == got.keys(), (family, method)
        assert all(expected[k].dtype == got[k].dtype and torch.equal(expected[k], got[k]) for k in expected)


def test_outputs_moved_together_still_load_and_a_missing_base_is_refused(chains, tmp_path):
    paths = chains["llama", "moe_lpr"]
    moved = shutil.copytree(paths["dense"].parent, tmp_path / "moved")
    assert load_in_fresh_process(moved / "review_slim").returncode == 0  # the relative references resolve

    shutil.rmtree(moved / "dense")
    shutil.move(paths["dense"], tmp_path / "away")  # the absolute reference fails too now
    try:
        run = load_in_fresh_process(moved / "review_slim")
    finally:
        shutil.move(tmp_path / "away", paths["dense"])
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()[-1]
    assert "SlimCheckpointError" in message and "`moelpr merge --model_path" in message
    missing = f"{moved / 'dense'}, which is missing or {paths['dense']}, which is missing"
    assert f"{moved / 'upcycled_slim'} refers to {missing};" in message


@pytest.fixture(scope="module")
def slim_upcycle(tiny_dense_dir, tmp_path_factory) -> dict[str, Path]:
    """A copy of the tiny dense LLaMA, its whole upcycle, and its slim upcycle referring to the copy."""
    root = tmp_path_factory.mktemp("slim_upcycle")
    dense = shutil.copytree(tiny_dense_dir("llama"), root / "dense")
    return {
        "root": root,
        "dense": dense,
        "whole": upcycle(dense, root / "whole", UpcycleSettings(moe_layers="0,2")),
        "slim": upcycle(dense, root / "slim", UpcycleSettings(moe_layers="0,2", slim=True)),
    }


@pytest.fixture(scope="module", autouse=True)
def private_fingerprint_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("fingerprint_cache")))
        yield


def copied_alone(slim_upcycle: dict[str, Path], to: Path) -> Path:
    """A copy of the dense model and its slim upcycle whose reference names the copy only (no absolute path)."""
    tree = shutil.copytree(slim_upcycle["root"], to, ignore=shutil.ignore_patterns("whole"))
    reference = json.loads((tree / "slim" / REFERENCE_NAME).read_text())
    (tree / "slim" / REFERENCE_NAME).write_text(json.dumps({**reference, "base_absolute": None}))
    return tree


def edit_embedding_rows(weights_file: Path, rows: slice, delta: float) -> None:
    weights = load_file(weights_file)
    weights["model.embed_tokens.weight"][rows] += delta
    save_file(weights, weights_file, metadata={"format": "pt"})


def test_an_edit_between_the_sampled_windows_is_refused_and_the_same_tensors_resharded_are_accepted(
    slim_upcycle, tmp_path
):
    whole = tensors(slim_upcycle["whole"])
    tree = copied_alone(slim_upcycle, tmp_path / "tree")
    dense_file = tree / "dense" / "model.safetensors"
    original = load_file(dense_file)
    # Rows 20-50 of the embedding lie between format 1's three 4 KiB windows (start, middle, end): it missed them.
    with CheckpointReader(tree / "dense") as reader:
        _, offset, length = reader.data_location("model.embed_tokens.weight")
        row_bytes = length // reader.spec("model.embed_tokens.weight").shape[0]
    edited = (20 * row_bytes, 51 * row_bytes)
    windows = [(at, at + 4096) for at in (0, (length - 4096) // 2, length - 4096)]
    assert all(edited[1] <= start or end <= edited[0] for start, end in windows)
    sampled_before = sampled_fingerprint(tree / "dense")
    edit_embedding_rows(dense_file, slice(20, 51), 1.0)
    assert sampled_fingerprint(tree / "dense") == sampled_before  # the hole format 1 had

    with pytest.raises(SlimCheckpointError, match="whose tensors changed since it was written"):
        ComposedCheckpoint(tree / "slim")

    # The original values, re-saved in other shards: accepted, and the model is the whole upcycle.
    dense_file.unlink()
    layout = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in reversed(original.items())]
    writer = ShardedWriter(tree / "dense", layout, max_shard_bytes=50_000)
    for spec in layout:
        writer.write(spec.name, original[spec.name])
    assert len(writer.finish()) > 1
    resharded = tensors(tree / "slim")
    assert resharded.keys() == whole.keys()  # in the new files' order
    assert all(torch.equal(resharded[k], whole[k]) for k in whole)


def test_a_reference_written_before_loads_and_is_checked_by_its_own_rule(slim_upcycle, tmp_path):
    tree = copied_alone(slim_upcycle, tmp_path / "tree")
    reference = json.loads((tree / "slim" / REFERENCE_NAME).read_text())
    assert reference["format_version"] == 2 and reference["fingerprint"].startswith("sha256-content:")
    # As format 1 wrote it (the fields it had, its sampled fingerprint).
    old = {key: reference[key] for key in ("base", "base_absolute", "base_format")}
    old.update(fingerprint=sampled_fingerprint(tree / "dense"), format_version=1)
    (tree / "slim" / REFERENCE_NAME).write_text(json.dumps(old))
    loaded = tensors(tree / "slim")
    whole = tensors(slim_upcycle["whole"])
    assert all(torch.equal(loaded[k], whole[k]) for k in whole)
    edit_embedding_rows(tree / "dense" / "model.safetensors", slice(0, 1), 1.0)  # inside its first window
    with pytest.raises(SlimCheckpointError, match="whose tensors changed since it was written"):
        ComposedCheckpoint(tree / "slim")


def test_digests_are_cached_by_file_and_an_edit_that_keeps_size_and_mtime_is_still_caught(
    slim_upcycle, tmp_path, monkeypatch
):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "fingerprint_cache"))
    dense = shutil.copytree(slim_upcycle["dense"], tmp_path / "dense")
    weights_file = dense / "model.safetensors"
    past = weights_file.stat().st_mtime_ns - 10**10
    os.utime(weights_file, ns=(past, past))
    before = content_fingerprint(dense)
    assert len(list((tmp_path / "fingerprint_cache").glob("*.json"))) == 1
    with weights_file.open("r+b") as handle:  # one byte of data, in place: same size, same inode
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    os.utime(weights_file, ns=(past, past))
    assert content_fingerprint(dense) != before


def test_a_base_reached_through_symlinks_resolves_and_every_candidate_is_tried_in_turn(slim_upcycle, tmp_path):
    whole = tensors(slim_upcycle["whole"])
    # Written in written/, then moved to real/ (the absolute path is gone) and seen through view/slim, a symlink.
    written = shutil.copytree(slim_upcycle["root"], tmp_path / "written", ignore=shutil.ignore_patterns("whole"))
    upcycle(written / "dense", written / "slim2", UpcycleSettings(moe_layers="0,2", slim=True))
    real = written.rename(tmp_path / "real")
    (tmp_path / "view").mkdir()
    (tmp_path / "view" / "slim").symlink_to(real / "slim2")
    viewed = tensors(tmp_path / "view" / "slim")
    assert list(viewed) == list(whole) and all(torch.equal(viewed[k], whole[k]) for k in whole)

    # The relative base changed, the recorded absolute one did not: it is the one used.
    moved = shutil.copytree(slim_upcycle["root"], tmp_path / "moved", ignore=shutil.ignore_patterns("whole"))
    edit_embedding_rows(moved / "dense" / "model.safetensors", slice(20, 51), 1.0)
    loaded = tensors(moved / "slim")
    assert all(torch.equal(loaded[k], whole[k]) for k in whole)

    reference = json.loads((moved / "slim" / REFERENCE_NAME).read_text())
    assert reference["base_absolute"] == str(slim_upcycle["dense"].resolve())
    reference["base_absolute"] = str(tmp_path / "gone")
    (moved / "slim" / REFERENCE_NAME).write_text(json.dumps(reference))
    with pytest.raises(SlimCheckpointError) as refused:
        ComposedCheckpoint(moved / "slim")
    assert str(refused.value).startswith(
        f"slim checkpoint {moved / 'slim'} refers to {moved / 'dense'}, whose tensors changed since it was written "
        f"or {tmp_path / 'gone'}, which is missing; "
    )


@pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed")
def test_llamafactory_stages_save_slim_outputs_that_load_and_resume_as_whole_ones(chains, tmp_path):
    paths = chains["llama", "moe_lpr"]
    stage1_recipe = {
        "dataset": "new_hu",
        "learning_rate": 1e-3,
        "max_steps": 2,
        "save_steps": 1,
        "moelpr_stage": "post_pretrain",
    }
    stage2_recipe = {
        **stage1_recipe,
        "learning_rate": 2e-2,
        "moelpr_stage": "review",
        "dataset": "new_hu,old_en",
        "generate_lang_mask": True,
    }
    runs = {}
    for kind, save_full in (("slim", False), ("whole", True)):
        stage1 = train(
            tmp_path,
            f"stage1_{kind}",
            model_name_or_path=str(paths[f"upcycled_{kind}"]),
            moelpr_save_full=save_full,
            **stage1_recipe,
        )
        stage2 = train(
            tmp_path, f"stage2_{kind}", model_name_or_path=str(stage1), moelpr_save_full=save_full, **stage2_recipe
        )
        runs[kind] = {"stage1": stage1, "stage2": stage2}
    # Resumed from the slim checkpoint-1 (its optimizer state included), the run continues as it went on.
    resumed = train(
        tmp_path,
        "stage2_resumed",
        model_name_or_path=str(runs["slim"]["stage1"]),
        resume_from_checkpoint=str(runs["slim"]["stage2"] / "checkpoint-1"),
        **stage2_recipe,
    )

    slim = runs["slim"]
    routers = {f"model.layers.{i}.mlp.router.weight" for i in (0, 2)}
    assert set(load_file(slim["stage2"] / "model.safetensors")) == routers
    assert set(load_file(slim["stage2"] / "checkpoint-1" / "model.safetensors")) == routers
    stage1_trained = set(load_file(slim["stage1"] / "model.safetensors"))
    assert stage1_trained and all(".mlp.router." in k or ".mlp.new_experts." in k for k in stage1_trained)
    assert (slim["stage2"] / "checkpoint-1" / "optimizer.pt").is_file()

    pairs = [(runs["whole"][key], slim[key]) for key in ("stage1", "stage2")]
    pairs.append((runs["whole"]["stage2"] / "checkpoint-1", slim["stage2"] / "checkpoint-1"))
    pairs.append((runs["whole"]["stage2"], resumed))
    report = compare_in_fresh_process(pairs)
    assert all(isinstance(result, int) for result in report.values()), report

    def losses(out: Path) -> list[tuple[int, float]]:
        log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        return [(entry["current_steps"], entry["loss"]) for entry in log if "loss" in entry]

    assert losses(resumed) == losses(slim["stage2"])[1:] == losses(runs["whole"]["stage2"])[1:]


@pytest.mark.skipif(CLI is None, reason="llamafactory-cli is not installed")
def test_moect_stage_saves_what_it_trains(chains, tmp_path):
    paths = chains["llama", "moe_ct"]
    out = train(
        tmp_path,
        "moect",
        model_name_or_path=str(paths["upcycled_slim"]),
        dataset="new_hu",
        learning_rate=1e-3,
        max_steps=1,
        save_steps=10,
    )
    stored = set(load_file(out / "model.safetensors"))
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= stored
    assert all(
        k in ("model.embed_tokens.weight", "lm_head.weight")
        or ".mlp.router." in k
        or ".mlp.fusion." in k
        or ".mlp.new_experts." in k
        for k in stored
    ), stored
    reference = json.loads((out / REFERENCE_NAME).read_text())
    assert reference["base_format"] == MOE_BASE and (out / reference["base"]).resolve() == paths["upcycled_slim"]
    assert os.path.isabs(reference["base_absolute"])
