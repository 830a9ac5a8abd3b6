"""Export an MoE-LPR checkpoint as a standard MoE checkpoint that transformers and serving engines load
without moelpr.

A LLaMA- or Mistral-family model becomes ``MixtralForCausalLM`` (or, with ``--format qwen2_moe``,
``Qwen2MoeForCausalLM``); a Qwen2-family model becomes ``Qwen2MoeForCausalLM``, a Qwen3 one
``Qwen3MoeForCausalLM``. All compute softmax -> top-k -> renormalise, which is MoE-LPR's routing, so the export
computes the same function. Tensors are written under the names of the public Mixtral / Qwen1.5-MoE / Qwen3-MoE
checkpoints (one tensor per expert), which is what vLLM, SGLang and llama.cpp's converter read. Gemma 3 has no
standard MoE format and is refused, as is an export that the target would compute differently, before anything
is written; see docs/export.md for what each engine serves.

This module is what the formats share: planning (:func:`plan_export`), the tensor renames and the streamed writing.
Each output architecture is a module of its own (:mod:`.mixtral`, :mod:`.qwen2_moe`, :mod:`.qwen3_moe`) behind the
:class:`~.format.MoEFormat` interface; what each dense family exports as is in :mod:`.families`.

The weights stream tensor by tensor from the source shards into the output shards, so a large model never
sits whole in memory, and the output directory appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.model_dir import CONFIG_NAME, require_model_dir
from ..checkpoints.slim import ComposedCheckpoint
from ..checkpoints.streaming import (
    parse_size,
    staged_directory,
    write_derived_tensors,
)
from ..models import MOE_FAMILIES
from ..models.moe import NEW_EXPERTS_NAME, ORIGINAL_EXPERT_NAME, ROUTER_NAME
from . import mixtral, qwen2_moe, qwen3_moe
from .families import EXPORT_FAMILIES, NO_STANDARD_FORMAT, ExportFamily
from .format import FFN_TENSORS, ExportError, MoEFormat, head_dim

# Copied byte for byte, so the export tokenizes, templates chats and generates as the source does.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
SIDECAR_FILES = (*TOKENIZER_FILES, "chat_template.jinja", "chat_template.json", "generation_config.json")

_FFN_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)\.weight")
_QKV_WEIGHT = re.compile(r"(model\.layers\.\d+\.self_attn\.[qkv]_proj)\.weight")

# The output architectures, one module each behind the MoEFormat interface.
FORMATS: dict[str, MoEFormat] = {fmt.name: fmt for fmt in (mixtral.FORMAT, qwen2_moe.FORMAT, qwen3_moe.FORMAT)}


# Source config fields every format takes unchanged.
SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_dropout",
    "rope_parameters",
    "num_experts_per_tok",
    "router_aux_loss_coef",
)


def check_method(config: Any) -> None:
    """The one place that says which MoE methods export. Only MoE-LPR (``moe_method`` "lpr") maps onto a
    standard MoE layer; another method that gains a mapping is accepted here and given its tensor names
    in :func:`_target_names`."""
    method = getattr(config, "moe_method", "lpr")
    if method != "lpr":
        raise ExportError(f"moe_method {method!r} has no standard MoE format; only MoE-LPR ('lpr') models export")


@dataclass
class ExportPlan:
    """A checked export: the source, the target format, and the numbers the tensor renames need."""

    model_path: Path
    config: Any  # the source's MoE-LPR config
    family: ExportFamily
    target: MoEFormat
    num_experts: int
    dense_layers: list[int]

    @property
    def zero_qkv_biases(self) -> bool:
        return self.target.qkv_bias and not self.family.qkv_bias


def _uniform_expert_count(config: Any) -> int:
    counts = config.num_experts if isinstance(config.num_experts, list) else [config.num_experts]
    if len(set(counts)) > 1:
        raise ExportError(
            f"its MoE layers have different expert counts {counts}, and Mixtral, Qwen2-MoE and Qwen3-MoE hold one "
            "count for all layers (padding with duplicate experts would change the softmax and the top-k)"
        )
    return counts[0]


def _setting_refusal(config: Any, family: ExportFamily, moe_format: MoEFormat) -> str | None:
    """Why ``moe_format`` would compute something else than ``config``'s model, or None."""
    if getattr(config, "quantization_config", None):
        return "it is quantized; export the full-precision checkpoint"
    if config.hidden_act != "silu":
        return f"hidden_act is {config.hidden_act!r}, and vLLM's and llama.cpp's MoE kernels apply SiLU"
    if moe_format.head_dim_from_hidden and head_dim(config) * config.num_attention_heads != config.hidden_size:
        return (
            f"head_dim {head_dim(config)} is not hidden_size / num_attention_heads, which vLLM's and llama.cpp's "
            f"{moe_format.architecture} assume"
        )
    return family.refusal(config)


def plan_export(model_path: str | os.PathLike, format_name: str | None = None) -> ExportPlan:
    """Check that ``model_path`` can be exported exactly as ``format_name`` (default: its family's first
    format); raises :class:`ExportError` with the reason otherwise. Reads only the config."""
    from transformers import AutoConfig

    model_path = require_model_dir(model_path)
    model_type = json.loads((model_path / CONFIG_NAME).read_text()).get("model_type")
    families = {config_class.model_type: dense for dense, (config_class, _) in MOE_FAMILIES.items()}
    if model_type not in families:
        raise ExportError(f"{model_path} is not an MoE-LPR checkpoint (model_type {model_type!r})")
    dense_type = families[model_type]
    if dense_type in NO_STANDARD_FORMAT:
        raise ExportError(f"cannot export {model_path} ({model_type}): {NO_STANDARD_FORMAT[dense_type]}")
    if dense_type not in EXPORT_FAMILIES:
        raise ExportError(f"{model_type} has no standard MoE format to export to")
    family = EXPORT_FAMILIES[dense_type]
    format_name = format_name or family.formats[0]
    if format_name not in family.formats:
        reason = family.not_exportable_as.get(format_name, f"{model_type} exports as {', '.join(family.formats)}")
        raise ExportError(f"cannot export {model_type} as {format_name}: {reason}")
    moe_format = FORMATS[format_name]

    try:
        config = AutoConfig.from_pretrained(model_path)
    except ValueError as error:
        raise ExportError(f"{model_path}/config.json is not a valid {model_type} config: {error}") from None
    check_method(config)
    num_experts = _uniform_expert_count(config)
    refusal = _setting_refusal(config, family, moe_format)
    if refusal:
        raise ExportError(f"cannot export {model_path} as {format_name}: {refusal}")
    dense_layers = [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]
    return ExportPlan(model_path, config, family, moe_format, num_experts, dense_layers)


def target_config(plan: ExportPlan) -> dict[str, Any]:
    """The export's config.json: a plain config of the target architecture, plus the pre-v5 keys
    (``rope_theta``, ``rope_scaling``, ``torch_dtype``) that engines built on older transformers read."""
    source = plan.config
    fields = {name: getattr(source, name) for name in SHARED_CONFIG_FIELDS}
    fields.update(plan.target.moe_config(source, plan.num_experts, plan.dense_layers))
    config = plan.target.config_class()(**fields, dtype=source.dtype)
    config.architectures = [plan.target.architecture]
    content = json.loads(config.to_json_string())
    rope = dict(content["rope_parameters"])
    content["rope_theta"] = rope.pop("rope_theta")
    content["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if content.get("dtype") is not None:
        content["torch_dtype"] = content["dtype"]
    for key, public_key in plan.target.public_config_keys.items():
        content[public_key] = content.pop(key)
    return content


def _target_names(plan: ExportPlan, name: str) -> list[str]:
    """Names of the source tensor ``name`` in the export (several for a dense layer stored as experts)."""
    match = _FFN_NAME.fullmatch(name)
    if match is None:
        return [name]
    layer, rest = int(match.group(1)), match.group(2)
    fmt = plan.target
    block = f"model.layers.{layer}.{fmt.block}"
    if rest == ROUTER_NAME:
        return [f"{block}.{fmt.router}.weight"]
    if rest in FFN_TENSORS:  # a dense layer
        if fmt.dense_layers_as_mlp:
            return [name]
        return [f"{block}.experts.{j}.{fmt.expert_tensors[rest]}.weight" for j in range(plan.num_experts)]
    expert, _, tensor = rest.rpartition(".")
    if expert == ORIGINAL_EXPERT_NAME:
        index = 0
    elif expert.startswith(f"{NEW_EXPERTS_NAME}.") and expert.split(".")[1].isdigit():
        index = int(expert.split(".")[1]) + 1
    else:
        index = None
    if index is None or tensor not in FFN_TENSORS:
        raise ExportError(f"{plan.model_path} holds a tensor the export does not know: {name}")
    return [f"{block}.experts.{index}.{fmt.expert_tensors[tensor]}.weight"]


def _added_tensors(plan: ExportPlan, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors the target needs beside the converted ``name``: zero q/k/v biases, a zero router for a dense
    layer stored as equal experts, and Qwen2-MoE's all-zero shared expert."""
    qkv = _QKV_WEIGHT.fullmatch(name)
    if qkv and plan.zero_qkv_biases:
        yield f"{qkv.group(1)}.bias", tensor.new_zeros(tensor.shape[0])
    match = _FFN_NAME.fullmatch(name)
    if match is None:
        return
    layer, rest = int(match.group(1)), match.group(2)
    block = f"model.layers.{layer}.{plan.target.block}"
    hidden = plan.config.hidden_size
    if rest == "gate_proj" and not plan.target.dense_layers_as_mlp:
        # Equal experts compute the dense FFN whatever the router says (the top-k weights sum to one).
        yield f"{block}.{plan.target.router}.weight", tensor.new_zeros(plan.num_experts, hidden)
    size = plan.target.zero_shared_expert_size
    if rest == ROUTER_NAME and size is not None:
        shared = f"{block}.shared_expert"
        yield f"{shared}.gate_proj.weight", tensor.new_zeros(size, hidden)
        yield f"{shared}.up_proj.weight", tensor.new_zeros(size, hidden)
        yield f"{shared}.down_proj.weight", tensor.new_zeros(hidden, size)
        yield f"{block}.shared_expert_gate.weight", tensor.new_zeros(1, hidden)


def _expected_source_names(plan: ExportPlan) -> set[str]:
    """Tensor names a complete checkpoint of the source config holds (from the model built on the meta
    device, which allocates nothing)."""
    from transformers.initialization import no_init_weights

    model_class = next(model for config, model in MOE_FAMILIES.values() if isinstance(plan.config, config))
    with torch.device("meta"), no_init_weights():
        model = model_class(plan.config)
    names = set(model.state_dict())
    if plan.config.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def _check_source_tensors(plan: ExportPlan, reader: ComposedCheckpoint) -> None:
    expected = _expected_source_names(plan)
    present = set(reader.names())
    if plan.config.tie_word_embeddings:
        present.discard("lm_head.weight")  # saved by some tools although tied; the export leaves it out
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if missing or unknown:
        raise ExportError(
            f"the weights of {plan.model_path} do not match its config (missing: {missing[:3]}, "
            f"unexpected: {unknown[:3]})"
        )


def export_tensors(
    plan: ExportPlan, names: list[str], get: Callable[[str], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The export's tensors from the source's (``names`` in order, ``get(name)``), one source tensor in memory at a
    time; floating tensors in the config's dtype (how transformers loads the source)."""
    dtype = plan.config.dtype
    for name in names:
        if name == "lm_head.weight" and plan.config.tie_word_embeddings:
            continue
        tensor = get(name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        targets = _target_names(plan, name)
        for target in targets:
            # Copies get their own memory: safetensors refuses tensors that share storage.
            yield target, tensor.clone() if len(targets) > 1 else tensor
        yield from _added_tensors(plan, name, tensor)


def export(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    format_name: str | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write the standard MoE checkpoint of the MoE-LPR model at ``model_path`` (weights, config, tokenizer,
    chat template, generation config) to ``output_path``; refuses with :class:`ExportError` before writing
    anything when the export would not compute what the source does."""
    return write_export(plan_export(model_path, format_name), output_path, max_shard_size)


def write_export(plan: ExportPlan, output_path: str | os.PathLike, max_shard_size: str | int) -> Path:
    """Write the checked export ``plan`` to ``output_path`` (see :func:`export`)."""
    output_path = Path(output_path)
    max_shard_bytes = parse_size(max_shard_size)
    if output_path.exists() and (not output_path.is_dir() or any(output_path.iterdir())):
        raise ExportError(f"--output_path {output_path} exists and is not empty; choose a new directory")
    sidecars = [plan.model_path / name for name in SIDECAR_FILES if (plan.model_path / name).is_file()]
    if not any(path.name in TOKENIZER_FILES for path in sidecars):
        raise ExportError(f"{plan.model_path} has no tokenizer files; engines need them to serve the export")
    config = target_config(plan)

    with ComposedCheckpoint(plan.model_path) as reader:  # a slim checkpoint too
        _check_source_tensors(plan, reader)
        with staged_directory(output_path) as staging:
            names = reader.names()
            write_derived_tensors(
                staging,
                reader,
                lambda get: export_tensors(plan, names, get),
                max_shard_bytes,
                desc=f"exporting to {plan.target.name}",
            )
            (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for path in sidecars:
                shutil.copy2(path, staging / path.name)
    return output_path


def describe(plan: ExportPlan) -> str:
    """What the export holds, for the command's output."""
    text = (
        f"{plan.target.architecture}: {plan.config.num_hidden_layers} layers, {plan.num_experts} experts, "
        f"top-{plan.config.num_experts_per_tok}"
    )
    if plan.dense_layers and not plan.target.dense_layers_as_mlp:
        text += (
            f"; dense layers {plan.dense_layers} are stored as {plan.num_experts} equal experts each "
            f"({plan.num_experts}x their FFN weights; each token runs {plan.config.num_experts_per_tok} of them)"
        )
    elif plan.dense_layers:
        text += f"; dense layers {plan.dense_layers} stay dense (mlp_only_layers)"
    return text
