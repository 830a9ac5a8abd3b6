"""Export an MoE-LPR checkpoint as a standard MoE checkpoint that transformers and serving engines load
without moelpr.

A LLaMA- or Mistral-family model becomes ``MixtralForCausalLM`` (or, with ``--format qwen2_moe``,
``Qwen2MoeForCausalLM``); a Qwen2-family model becomes ``Qwen2MoeForCausalLM``, a Qwen3 one
``Qwen3MoeForCausalLM``. All compute softmax -> top-k -> renormalise, which is MoE-LPR's routing, so the export
computes the same function. Tensors are written under the names of the public Mixtral / Qwen1.5-MoE / Qwen3-MoE
checkpoints (one tensor per expert), which is what vLLM, SGLang and llama.cpp's converter read. Gemma 3 has no
standard MoE format and is refused, as is an export that the target would compute differently, before anything
is written; see docs/export.md for what each engine serves.

The weights stream tensor by tensor from the source shards into the output shards, so a large model never
sits whole in memory, and the output directory appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from ..errors import MoELPRUserError
from ..models import MOE_FAMILIES
from ..models.moe import NEW_EXPERTS_NAME, ORIGINAL_EXPERT_NAME, ROUTER_NAME

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

FFN_TENSORS = ("gate_proj", "up_proj", "down_proj")

# Size of Qwen2-MoE's shared expert, whose weights are all zero: Qwen2-MoE has one in every MoE layer, and it
# must add exactly nothing. 256 is the smallest size that every engine takes: a multiple of llama.cpp's
# largest quantisation block (QK_K = 256, along the rows of down_proj) and of any tensor-parallel degree.
ZERO_SHARED_EXPERT_SIZE = 256

_FFN_NAME = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)\.weight")
_QKV_WEIGHT = re.compile(r"(model\.layers\.\d+\.self_attn\.[qkv]_proj)\.weight")


class ExportError(MoELPRUserError, ValueError):
    """A checkpoint or request that cannot be exported exactly; printed as one line."""


@dataclass(frozen=True)
class MoEFormat:
    """A standard MoE architecture and where an MoE-LPR layer's tensors go in it."""

    name: str
    architecture: str
    model_type: str
    block: str  # module of a decoder layer that holds the router and the experts
    router: str  # the router's name inside ``block``
    expert_tensors: dict[str, str]  # FFN tensor -> its name inside one expert
    qkv_bias: bool  # its attention has q/k/v biases (written as zeros for a family without them)
    head_dim_from_hidden: bool  # engines take the head size to be hidden_size / num_attention_heads
    dense_layers_as_mlp: bool  # True: dense layers stay plain MLPs; False: N equal experts under a zero router
    zero_shared_expert: bool  # every MoE layer has a gated shared expert, written with all-zero weights
    moe_config: Callable[[Any, int, list[int]], dict[str, Any]]  # (source config, experts, dense layers) -> fields
    # config.json keys transformers 5 writes under another name than the public checkpoints (and engines built on
    # transformers 4) read: transformers' name -> the public one.
    public_config_keys: dict[str, str] = field(default_factory=dict)

    def config_class(self) -> type:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[self.model_type]


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _mixtral_config(config: Any, num_experts: int, dense_layers: list[int]) -> dict[str, Any]:
    # A Mistral window is carried over only when no position falls outside it (see _mistral_refusal).
    return {
        "num_local_experts": num_experts,
        "head_dim": _head_dim(config),
        "sliding_window": getattr(config, "sliding_window", None),
    }


def _qwen2_moe_config(config: Any, num_experts: int, dense_layers: list[int]) -> dict[str, Any]:
    return {
        "num_experts": num_experts,
        "moe_intermediate_size": config.intermediate_size,
        "shared_expert_intermediate_size": ZERO_SHARED_EXPERT_SIZE,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layers,
        "qkv_bias": True,
        "use_sliding_window": False,
        "max_window_layers": config.num_hidden_layers,
    }


def _qwen3_moe_config(config: Any, num_experts: int, dense_layers: list[int]) -> dict[str, Any]:
    return {
        "num_experts": num_experts,
        "moe_intermediate_size": config.intermediate_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense_layers,
        "head_dim": config.head_dim,
        "attention_bias": False,
        "use_sliding_window": False,
    }


FORMATS: dict[str, MoEFormat] = {
    "mixtral": MoEFormat(
        name="mixtral",
        architecture="MixtralForCausalLM",
        model_type="mixtral",
        block="block_sparse_moe",
        router="gate",
        expert_tensors={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
        qkv_bias=False,
        head_dim_from_hidden=False,
        dense_layers_as_mlp=False,
        zero_shared_expert=False,
        moe_config=_mixtral_config,
    ),
    "qwen2_moe": MoEFormat(
        name="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        model_type="qwen2_moe",
        block="mlp",
        router="gate",
        expert_tensors={name: name for name in FFN_TENSORS},
        qkv_bias=True,
        head_dim_from_hidden=True,
        dense_layers_as_mlp=True,
        zero_shared_expert=True,
        moe_config=_qwen2_moe_config,
    ),
    "qwen3_moe": MoEFormat(
        name="qwen3_moe",
        architecture="Qwen3MoeForCausalLM",
        model_type="qwen3_moe",
        block="mlp",
        router="gate",
        expert_tensors={name: name for name in FFN_TENSORS},
        qkv_bias=False,
        head_dim_from_hidden=False,
        dense_layers_as_mlp=True,
        zero_shared_expert=False,
        moe_config=_qwen3_moe_config,
        public_config_keys={"num_local_experts": "num_experts"},
    ),
}


def _llama_refusal(config: Any) -> str | None:
    if config.attention_bias:
        return "attention_bias is set, and neither Mixtral nor Qwen2-MoE has biases on every attention projection"
    if config.mlp_bias:
        return "mlp_bias is set, and neither Mixtral's nor Qwen2-MoE's experts have biases"
    return None


def _qwen2_refusal(config: Any) -> str | None:
    if config.use_sliding_window or "sliding_attention" in (config.layer_types or []):
        return "it uses sliding-window attention, which vLLM's and llama.cpp's Qwen2-MoE do not implement"
    return None


def _qwen3_refusal(config: Any) -> str | None:
    if config.use_sliding_window or "sliding_attention" in (config.layer_types or []):
        return "it uses sliding-window attention, which vLLM's and llama.cpp's Qwen3-MoE do not implement"
    if config.attention_bias:
        return "attention_bias is set, and vLLM's Qwen3-MoE has no o_proj bias"
    return None


def _mistral_refusal(config: Any) -> str | None:
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        return (
            f"sliding_window {config.sliding_window} is shorter than max_position_embeddings "
            f"{config.max_position_embeddings}, and vLLM's and llama.cpp's Mixtral attend to every position"
        )
    return None


@dataclass(frozen=True)
class ExportFamily:
    """What the export needs to know of a dense family: the formats that hold it and what they cannot hold."""

    formats: tuple[str, ...]  # the first is the default
    qkv_bias: bool  # its q/k/v projections have biases
    refusal: Callable[[Any], str | None]  # a setting of the family no format holds, or None
    not_exportable_as: dict[str, str] = field(default_factory=dict)  # format -> why not


_QK_NORM = "attention has no q/k norms, which Qwen3's normalises queries and keys with"

# Dense model_type -> how its MoE-LPR checkpoints export.
EXPORT_FAMILIES: dict[str, ExportFamily] = {
    "llama": ExportFamily(formats=("mixtral", "qwen2_moe"), qkv_bias=False, refusal=_llama_refusal),
    "qwen2": ExportFamily(
        formats=("qwen2_moe",),
        qkv_bias=True,
        refusal=_qwen2_refusal,
        not_exportable_as={"mixtral": "Mixtral's attention has no q/k/v biases, which Qwen2's uses"},
    ),
    "qwen3": ExportFamily(
        formats=("qwen3_moe",),
        qkv_bias=False,
        refusal=_qwen3_refusal,
        not_exportable_as={"mixtral": f"Mixtral's {_QK_NORM}", "qwen2_moe": f"Qwen2-MoE's {_QK_NORM}"},
    ),
    "mistral": ExportFamily(formats=("mixtral", "qwen2_moe"), qkv_bias=False, refusal=_mistral_refusal),
}

# Dense model_type -> why no standard MoE format holds its MoE-LPR checkpoints.
NO_STANDARD_FORMAT: dict[str, str] = {
    "gemma3_text": (
        "no standard MoE architecture computes Gemma 3's layers: Mixtral's and the Qwen MoEs' have neither its GELU "
        "experts nor its pre- and post-feed-forward norms, and Gemma 4's MoE layers add a dense FFN beside the "
        "experts; load the MoE-LPR checkpoint itself (transformers with moelpr installed)"
    ),
}

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
    if moe_format.head_dim_from_hidden and _head_dim(config) * config.num_attention_heads != config.hidden_size:
        return (
            f"head_dim {_head_dim(config)} is not hidden_size / num_attention_heads, which vLLM's and llama.cpp's "
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
    if rest == ROUTER_NAME and plan.target.zero_shared_expert:
        shared = f"{block}.shared_expert"
        yield f"{shared}.gate_proj.weight", tensor.new_zeros(ZERO_SHARED_EXPERT_SIZE, hidden)
        yield f"{shared}.up_proj.weight", tensor.new_zeros(ZERO_SHARED_EXPERT_SIZE, hidden)
        yield f"{shared}.down_proj.weight", tensor.new_zeros(hidden, ZERO_SHARED_EXPERT_SIZE)
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
                staging, reader, lambda get: export_tensors(plan, names, get), max_shard_bytes,
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
