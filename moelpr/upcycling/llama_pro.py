"""LLaMA-Pro block expansion (arXiv 2401.02415): deepen a dense model with blocks that start as the identity.

The L decoder layers are split into N groups of L/N; after each group a copy of the group's last layer is
inserted whose output projections (attention ``o_proj``, FFN ``down_proj``) are zero. Both sub-blocks of a
pre-norm decoder layer add their output to the residual stream, so a zeroed block adds exactly zero and the
expanded model computes the dense function. Training then updates only the new blocks.

The positions match LLaMA-Factory's ``use_llama_pro`` rule: on a model of L + N layers with
``freeze_trainable_layers: N`` it trains layers ``s - 1, 2s - 1, ...`` with stride ``s = (L + N) / N = L/N + 1``,
which are exactly the blocks inserted after each group here.

Weights are streamed tensor by tensor (:mod:`moelpr.checkpoints.streaming`), so the model never sits whole in memory,
and the output directory appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints.model_dir import CONFIG_NAME, require_model_dir
from ..checkpoints.streaming import (
    CheckpointReader,
    parse_size,
    staged_directory,
    write_derived_tensors,
)
from ..errors import MoELPRUserError
from .upcycle import TOKENIZER_FILES

# Files beside the weights that belong to the expanded model too: tokenizer, chat template, generation defaults,
# the licence. Weights and config.json are written anew; trainer state or a README about the dense model are not
# carried over.
AUXILIARY_FILE_PATTERNS = (
    "generation_config.json",
    "tokenizer*",
    "vocab.*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "LICENSE*",
    "NOTICE*",
)


class ExpansionError(MoELPRUserError, ValueError):
    """A user-facing problem with the expansion request."""


@dataclass(frozen=True)
class ExpansionFamily:
    """Where a family keeps its decoder layers and what a new block must zero to add nothing."""

    layers_prefix: str = "model.layers."
    # Sub-modules of a layer whose outputs are added to the residual stream (weight and, if any, bias).
    residual_outputs: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # Config lists with one entry per layer (a new block takes its source layer's entry).
    per_layer_lists: tuple[str, ...] = ()
    # Config ints naming the first layer of a suffix of layers (shifted past the new blocks inserted before it).
    layer_boundaries: tuple[str, ...] = ()


FAMILIES = {
    "llama": ExpansionFamily(),
    "mistral": ExpansionFamily(),
    # Qwen2 and Qwen3 mark sliding-window layers per layer (layer_types) and by the first sliding layer
    # (max_window_layers).
    "qwen2": ExpansionFamily(per_layer_lists=("layer_types",), layer_boundaries=("max_window_layers",)),
    "qwen3": ExpansionFamily(per_layer_lists=("layer_types",), layer_boundaries=("max_window_layers",)),
    # Gemma 3 alternates sliding-window and global layers (layer_types); its post-attention and post-feed-forward
    # norms map the zeroed projections' output, zero, to zero.
    "gemma3_text": ExpansionFamily(per_layer_lists=("layer_types",)),
}


def expansion_plan(num_layers: int, num_expand: int) -> list[tuple[int, bool]]:
    """For each layer of the expanded model: (index of the dense layer it comes from, whether it is a new block)."""
    group = num_layers // num_expand
    plan = []
    for source in range(num_layers):
        plan.append((source, False))
        if (source + 1) % group == 0:
            plan.append((source, True))
    return plan


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _check_request(model_path: Path, output_path: Path, num_expand: int) -> tuple[dict, ExpansionFamily]:
    if num_expand < 1:
        raise ExpansionError(f"--num_expand must be at least 1, got {num_expand}.")
    config_file = require_model_dir(model_path) / CONFIG_NAME
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        if model_type and model_type.endswith("_moelpr"):
            raise ExpansionError(
                f"{model_path} is an upcycled MoE-LPR model ({model_type}); LLaMA-Pro expands a dense model."
            )
        raise ExpansionError(
            f"cannot expand model_type {model_type!r}: supported families are {', '.join(sorted(FAMILIES))}."
        )
    if not any((model_path / name).is_file() for name in TOKENIZER_FILES):
        raise ExpansionError(f"--model_path {model_path} has no tokenizer files; the expanded checkpoint needs them.")
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ExpansionError(f"{config_file} has no valid num_hidden_layers ({num_layers!r}).")
    if num_layers % num_expand:
        raise ExpansionError(
            f"--num_expand {num_expand} does not divide the model's {num_layers} layers into equal groups; "
            f"choose one of {', '.join(map(str, _divisors(num_layers)))}."
        )
    if output_path.exists() and (not output_path.is_dir() or any(output_path.iterdir())):
        raise ExpansionError(f"--output_path {output_path} already exists and is not empty; choose a new directory.")
    family = FAMILIES[model_type]
    missing = [key for key in family.per_layer_lists if config.get(key) is None]
    if missing:
        # Older checkpoints leave them to the config class (Gemma 3's sliding_window_pattern), whose rule would not
        # give the new blocks their source layer's entry: write them out as transformers reads them.
        from transformers import AutoConfig

        dense_config = AutoConfig.from_pretrained(model_path)
        config = {**config, **{key: getattr(dense_config, key, None) for key in missing}}
    return config, family


def expand_config(config: dict, num_expand: int, family: ExpansionFamily) -> dict:
    """The dense ``config.json`` contents -> the expanded model's (a new dict)."""
    num_layers = config["num_hidden_layers"]
    plan = expansion_plan(num_layers, num_expand)
    expanded = dict(config, num_hidden_layers=len(plan))
    for key in family.per_layer_lists:
        values = config.get(key)
        if values is None:
            continue
        if len(values) != num_layers:
            raise ExpansionError(f"config {key!r} has {len(values)} entries for {num_layers} layers.")
        expanded[key] = [values[source] for source, _ in plan]
    for key in family.layer_boundaries:
        boundary = config.get(key)
        if boundary is not None:
            expanded[key] = boundary + sum(1 for source, new in plan if new and source < boundary)
    return expanded


def _layer_tensors(reader: CheckpointReader, family: ExpansionFamily, num_layers: int) -> dict[int, list[str]]:
    """Tensor suffixes (``self_attn.q_proj.weight``...) of each layer, checked to be complete and expandable."""
    layers: dict[int, list[str]] = {}
    for name in reader.names():
        if name.startswith(family.layers_prefix):
            index, _, suffix = name.removeprefix(family.layers_prefix).partition(".")
            layers.setdefault(int(index), []).append(suffix)
    if sorted(layers) != list(range(num_layers)):
        raise ExpansionError(
            f"the weights hold layers {min(layers, default=None)}..{max(layers, default=None)} ({len(layers)} in "
            f"all), but config.json says num_hidden_layers = {num_layers}."
        )
    for index, suffixes in layers.items():
        missing = [module for module in family.residual_outputs if f"{module}.weight" not in suffixes]
        if missing:
            raise ExpansionError(
                f"layer {index} has no {', '.join(missing)} weight; a new block could not start as the identity."
            )
    return layers


def _starts_at_zero(suffix: str, family: ExpansionFamily) -> bool:
    return any(suffix.startswith(f"{module}.") for module in family.residual_outputs)


def expand(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    num_expand: int,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write the block-expanded checkpoint (weights, config, tokenizer) of the dense model at ``model_path``."""
    model_path, output_path = Path(model_path), Path(output_path)
    config, family = _check_request(model_path, output_path, num_expand)
    max_shard_bytes = parse_size(max_shard_size)
    num_layers = config["num_hidden_layers"]
    expanded_config = expand_config(config, num_expand, family)
    plan = expansion_plan(num_layers, num_expand)

    with CheckpointReader(model_path) as reader:
        layers = _layer_tensors(reader, family, num_layers)
        other_names = [name for name in reader.names() if not name.startswith(family.layers_prefix)]

        def expanded_tensors(get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
            for target, (source, new) in enumerate(plan):
                for suffix in layers[source]:
                    tensor = get(f"{family.layers_prefix}{source}.{suffix}")
                    if new and _starts_at_zero(suffix, family):
                        tensor = torch.zeros_like(tensor)
                    yield f"{family.layers_prefix}{target}.{suffix}", tensor
            for name in other_names:  # embeddings, final norm, an untied lm_head: unchanged
                yield name, get(name)

        with staged_directory(output_path) as staging:
            write_derived_tensors(staging, reader, expanded_tensors, max_shard_bytes, desc="expanding")
            (staging / "config.json").write_text(json.dumps(expanded_config, indent=2, sort_keys=True) + "\n")
            for pattern in AUXILIARY_FILE_PATTERNS:
                for path in model_path.glob(pattern):
                    if path.is_file():
                        shutil.copy2(path, staging / path.name)
    return output_path
