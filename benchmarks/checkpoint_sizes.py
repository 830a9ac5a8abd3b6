"""Bytes a whole and a slim checkpoint hold at each step of MoE-LPR and MoE-CT, computed from a model's shapes.

Run by hand (results in benchmarks/README.md); nothing is allocated: the upcycled model is built on the meta
device and the plugin's own freeze rules say what each stage trains (what a slim save of that stage holds).

    python benchmarks/checkpoint_sizes.py            # SmolLM2-135M (the demo) and LLaMA-3-8B, 4 experts
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from moelpr.llamafactory_plugin.model import trainable_parameter_names
from moelpr.llamafactory_plugin.setting_values import POST_PRETRAIN, REVIEW
from moelpr.models import MOE_FAMILIES
from moelpr.models.configuration import CT, LPR

SHAPES = {
    "SmolLM2-135M (the demo)": LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "LLaMA-3-8B": LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def sizes(dense_config: LlamaConfig, moe_method: str, num_experts: int, top_k: int) -> dict[str, int]:
    """Parameters of the whole upcycled model, of what a slim upcycle stores, and of what each stage trains."""
    config_class, model_class = MOE_FAMILIES["llama"]
    config = config_class.from_dense(
        dense_config, moe_method=moe_method, num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=None
    )
    with torch.device("meta"):
        model = model_class(config)
    params = dict(model.named_parameters())  # tied embeddings counted once, as a checkpoint stores them
    count = {"whole": sum(p.numel() for p in params.values())}
    count["slim upcycle"] = sum(p.numel() for n, p in params.items() if ".mlp.router." in n or ".mlp.fusion." in n)
    stages = [(POST_PRETRAIN, False)] if moe_method == LPR else [(POST_PRETRAIN, True), (POST_PRETRAIN, False)]
    for stage, embeddings in stages:
        name = {POST_PRETRAIN: "stage 1", REVIEW: "stage 2"}[stage] if moe_method == LPR else "MoE-CT stage"
        name += " (embeddings train)" if embeddings else ""
        count[name] = sum(params[n].numel() for n in trainable_parameter_names(model, stage, embeddings))
    if moe_method == LPR:
        count["stage 2"] = sum(params[n].numel() for n in trainable_parameter_names(model, REVIEW, False))
    return count


def main() -> None:
    for shape, dense_config in SHAPES.items():
        for moe_method, experts, top_k in ((LPR, 4, 2), (CT, 2, 1)):
            print(f"\n{shape}, {'MoE-LPR' if moe_method == LPR else 'MoE-CT'}, {experts} experts, top-{top_k}")
            for name, params in sizes(dense_config, moe_method, experts, top_k).items():
                print(
                    f"  {name:<32} {params:>15,d} params  {params * 2 / 1e6:11.2f} MB bf16  {params * 4 / 1e6:11.2f} MB fp32"
                )


if __name__ == "__main__":
    main()
