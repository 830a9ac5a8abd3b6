"""Upcycle a dense causal LM into its MoE-LPR form, preserving the function it computes.

Each chosen layer's FFN becomes expert 0 (the same tensors) and is copied into experts 1..N-1; the
router starts random. Because all experts are equal and the top-k weights are renormalised to sum to
one, the upcycled model's outputs equal the dense model's whatever the router says.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from .models import MOE_FAMILIES
from .models.moe import NEW_EXPERTS_NAME, ORIGINAL_EXPERT_NAME, ROUTER_NAME

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class UpcyclingError(ValueError):
    """A user-facing problem with the upcycling request."""


def parse_layers(spec: str | None, num_layers: int) -> list[int] | None:
    """``None``/``"all"`` -> every layer; ``"0,2,5-7"`` -> those layers; ``"every:2"`` -> 0, 2, 4, ..."""
    if spec is None or spec.strip().lower() == "all":
        return None
    spec = spec.strip()
    try:
        if spec.startswith("every:"):
            layers = list(range(0, num_layers, int(spec.split(":", 1)[1])))
        else:
            layers = []
            for part in spec.split(","):
                start, _, end = part.partition("-")
                layers.extend(range(int(start), int(end or start) + 1))
    except ValueError:
        raise UpcyclingError(f"--moe_layers {spec!r} is not 'all', 'every:K' or a list like '0,2,5-7'.") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise UpcyclingError(f"--moe_layers {spec!r} names layers outside 0..{num_layers - 1}: {bad or 'none'}.")
    return sorted(set(layers))


def _check_request(model_path: Path, output_path: Path, num_experts: int, top_k: int) -> dict:
    if num_experts < 2:
        raise UpcyclingError(f"--num_experts must be at least 2 (the original FFN plus new experts), got {num_experts}.")
    if not 1 <= top_k <= num_experts:
        raise UpcyclingError(f"--topk must be between 1 and --num_experts ({num_experts}), got {top_k}.")
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise UpcyclingError(f"--model_path {model_path} is not a model directory (no config.json there).")
    if not any((model_path / f).is_file() for f in TOKENIZER_FILES):
        raise UpcyclingError(f"--model_path {model_path} has no tokenizer files; the upcycled checkpoint needs them.")
    dense_config = json.loads(config_file.read_text())
    model_type = dense_config.get("model_type")
    if model_type not in MOE_FAMILIES:
        if model_type and model_type.endswith("_moelpr"):
            raise UpcyclingError(f"{model_path} is already an upcycled MoE-LPR model ({model_type}).")
        raise UpcyclingError(
            f"cannot upcycle model_type {model_type!r}: supported families are {', '.join(sorted(MOE_FAMILIES))}."
        )
    if output_path.exists() and (not output_path.is_dir() or any((output_path / f).exists() for f in MODEL_FILES)):
        raise UpcyclingError(f"--output_path {output_path} already holds a model; choose a new directory.")
    return dense_config


def upcycle_state_dict(
    dense_state: dict[str, torch.Tensor], moe_layers: list[int], num_experts: int, router_weights: dict[int, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Dense parameter names and tensors -> the MoE model's; FFN copies are independent tensors."""
    moe_state = {}
    for name, tensor in tqdm(dense_state.items(), desc="upcycling", unit="tensor", disable=None):
        layer_idx = _ffn_layer(name)
        if layer_idx is None or layer_idx not in moe_layers:
            moe_state[name] = tensor
            continue
        prefix, suffix = name.split(".mlp.", 1)
        moe_state[f"{prefix}.mlp.{ORIGINAL_EXPERT_NAME}.{suffix}"] = tensor
        for j in range(num_experts - 1):
            moe_state[f"{prefix}.mlp.{NEW_EXPERTS_NAME}.{j}.{suffix}"] = tensor.clone()
        moe_state[f"{prefix}.mlp.{ROUTER_NAME}.weight"] = router_weights[layer_idx]
    return moe_state


def _ffn_layer(name: str) -> int | None:
    parts = name.split(".")
    if "mlp" not in parts or "layers" not in parts:
        return None
    return int(parts[parts.index("layers") + 1])


def upcycle(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    num_experts: int = 4,
    top_k: int = 2,
    moe_layers: list[int] | str | None = None,
    seed: int = 0,
) -> Path:
    """Write the upcycled checkpoint (weights, config, tokenizer) of the dense model at ``model_path``.

    The output appears whole or not at all: everything is written to a temporary sibling directory
    that is renamed into place at the end.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    model_path, output_path = Path(model_path), Path(output_path)
    dense_config = _check_request(model_path, output_path, num_experts, top_k)
    num_layers = dense_config["num_hidden_layers"]
    if moe_layers is None or isinstance(moe_layers, str):
        moe_layers = parse_layers(moe_layers, num_layers)

    config_class, model_class = MOE_FAMILIES[dense_config["model_type"]]
    dense = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    config = config_class.from_dense(
        dense.config, num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=moe_layers
    )
    dtype = dense.dtype
    layer_indices = config.moe_layer_indices

    generator = torch.Generator().manual_seed(seed)
    router_weights = {
        i: (torch.randn(num_experts, config.hidden_size, generator=generator) * config.initializer_range).to(dtype)
        for i in layer_indices
    }
    state = upcycle_state_dict(dense.state_dict(), layer_indices, num_experts, router_weights)
    del dense
    # Every weight is overwritten below, so skip the random initialisation (slow on large models).
    with no_init_weights():
        moe = model_class(config).to(dtype)
    moe.load_state_dict(state, strict=True, assign=True)
    moe.tie_weights()

    output_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent))
    try:
        moe.save_pretrained(staging)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(staging)
        if output_path.exists():  # an empty directory passed the checks above
            output_path.rmdir()
        staging.rename(output_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Upcycle a dense LLaMA/Qwen2 checkpoint into an MoE-LPR model.")
    parser.add_argument("--model_path", required=True, help="dense HF checkpoint directory")
    parser.add_argument("--output_path", required=True, help="new directory for the MoE checkpoint")
    parser.add_argument("--num_experts", type=int, default=4, help="experts per MoE layer, expert 0 = original FFN")
    parser.add_argument("--topk", type=int, default=2, help="experts per token")
    parser.add_argument(
        "--moe_layers", default=None, help="'all' (default), 'every:K', or indices like '0,2,5-7'; other layers stay dense"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = upcycle(args.model_path, args.output_path, args.num_experts, args.topk, args.moe_layers, args.seed)
    except UpcyclingError as error:
        print(f"moelpr upcycle: error: {error}", file=sys.stderr)
        return 2
    print(f"Upcycled checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
