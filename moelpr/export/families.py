"""What the export knows of each dense family: the formats that hold its MoE-LPR checkpoints, and the settings of
the family that no format computes (refused with the reason before anything is written)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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
