"""Slim checkpoints on the Hub (docs/checkpoints.md): a repo id or a ``subfolder`` finds the reference through
transformers' own file resolution, a base named by a Hub id is fetched the same way, and a slim checkpoint whose
base cannot be reached is refused. An offline Hugging Face cache stands in for the Hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelpr.checkpoints.fingerprint import CACHE_ENV
from moelpr.checkpoints.slim import REFERENCE_NAME

# Run with HF_HUB_CACHE and HF_HUB_OFFLINE=1 (read when huggingface_hub is imported): writes the references that
# name the Hub base, then loads every slim checkpoint and says which tensors differ from the whole model's.
LOAD = """
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from moelpr.checkpoints.slim import MOE_BASE, is_base_of, write_reference
hub, run, whole = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
snapshot = next((hub / "models--org--slim" / "snapshots").iterdir())
for directory in (snapshot, snapshot / "checkpoint-1"):
    write_reference(directory, "org/base", MOE_BASE)
expected = AutoModelForCausalLM.from_pretrained(whole).state_dict()
report = {}
for name, kwargs in [("org/slim", {}), ("org/slim", {"subfolder": "checkpoint-1"}),
                     (str(run), {"subfolder": "checkpoint-1"})]:
    got = AutoModelForCausalLM.from_pretrained(name, **kwargs).state_dict()
    differ = [k for k in expected if k not in got or not torch.equal(expected[k], got[k])]
    report[f"{name} {kwargs}"] = differ + [k for k in got if k not in expected] or len(got)
report["is_base_of"] = [is_base_of(snapshot, "org/base"), is_base_of(snapshot, str(run))]
report["reference"] = json.loads((snapshot / "moelpr_reference.json").read_text())
print(json.dumps(report))
try:
    AutoModelForCausalLM.from_pretrained("org/orphan")
except Exception as error:
    print(f"{type(error).__name__}: {error}")
"""


def hub_repo(hub: Path, repo_id: str, files: Path, revision: str) -> Path:
    """``files`` as the cached snapshot of ``repo_id`` at ``revision``, as huggingface_hub lays it out."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return shutil.copytree(files, repo / "snapshots" / revision)


def test_slim_checkpoints_load_from_a_hub_id_and_a_subfolder_or_are_refused(upcycled_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from moelpr.checkpoints.slim import MOE_BASE, write_reference

    # A stage's output and its checkpoint-1, saved slim (the routers it trained) over the upcycled model.
    model = AutoModelForCausalLM.from_pretrained(upcycled_llama_dir)
    routers = {name for name in model.state_dict() if ".mlp.router." in name}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in routers:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(tmp_path / "whole")
    slim = {name: tensor for name, tensor in model.state_dict().items() if name in routers}
    run = tmp_path / "run"
    for directory in (run, run / "checkpoint-1"):
        model.save_pretrained(directory, state_dict=slim)
    write_reference(run / "checkpoint-1", upcycled_llama_dir, MOE_BASE)

    hub = tmp_path / "hub"
    hub_repo(hub, "org/base", upcycled_llama_dir, "a" * 40)
    hub_repo(hub, "org/slim", run, "b" * 40)
    # A slim output uploaded as it is, its base a path of the machine it was written on: unreachable here.
    orphan = hub_repo(hub, "org/orphan", run / "checkpoint-1", "c" * 40)
    reference = json.loads((orphan / REFERENCE_NAME).read_text())
    reference.update(base="../upcycled", base_absolute=str(tmp_path / "elsewhere"))
    (orphan / REFERENCE_NAME).write_text(json.dumps(reference))

    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", CACHE_ENV: str(tmp_path / "cache")}
    args = [str(hub), str(run), str(tmp_path / "whole")]
    done = subprocess.run([sys.executable, "-c", LOAD, *args], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report_line, refusal = done.stdout.strip().splitlines()[-2:]
    report = json.loads(report_line)

    loads = {key: value for key, value in report.items() if key.startswith(("org/", str(run)))}
    assert len(loads) == 3 and all(isinstance(value, int) and value > 0 for value in loads.values()), loads
    assert report["is_base_of"] == [True, False]
    recorded = report["reference"]
    assert (recorded["base"], recorded["base_absolute"], recorded["base_revision"]) == ("org/base", None, "a" * 40)
    assert set(load_file(hub / "models--org--slim" / "snapshots" / ("b" * 40) / "model.safetensors")) == routers

    assert refusal.startswith("SlimCheckpointError: slim checkpoint ")
    assert (
        f"refers to {orphan.parent / 'upcycled'}, which is missing or {tmp_path / 'elsewhere'}, which is missing;"
        in refusal
    )
    assert "`moelpr merge --model_path" in refusal


@pytest.mark.parametrize("name", ["org/not-cached", "no/such/thing"])
def test_a_name_that_is_no_slim_checkpoint_is_left_to_transformers(name, tmp_path, monkeypatch):
    from moelpr.checkpoints.slim import find_slim_checkpoint

    monkeypatch.chdir(tmp_path)
    assert find_slim_checkpoint(name, local_files_only=True, cache_dir=str(tmp_path)) is None
