"""What ``finetuning_type: moelpr`` does to the loaded model: freeze rules, loss weights, ZeRO-3 leaf."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from llamafactory.extras import logging
from transformers.integrations import is_deepspeed_zero3_enabled

from moelpr.models import MOE_BLOCK_CLASSES, MOE_FAMILIES
from moelpr.models.configuration import CT, LPR
from moelpr.models.moe import NEW_EXPERTS_NAME, ROUTER_NAME
from moelpr.models.moe_ct import FUSION_NAME

from .setting_values import MOELPR, POST_PRETRAIN, REVIEW

logger = logging.get_logger(__name__)

MOELPR_MODEL_TYPES = frozenset(config_class.model_type for config_class, _ in MOE_FAMILIES.values())

# MoE parameters trained by (method, stage). MoE-LPR's stage 1 grows the new experts (and learns to route to
# them), its stage 2 only re-learns routing; MoE-CT's one stage trains the routed experts, their router and the
# fusion layer (and, unless turned off, the embeddings and the LM head: see trainable_parameter_names).
TRAINABLE_MODULES = {
    (LPR, POST_PRETRAIN): (ROUTER_NAME, NEW_EXPERTS_NAME),
    (LPR, REVIEW): (ROUTER_NAME,),
    (CT, POST_PRETRAIN): (ROUTER_NAME, NEW_EXPERTS_NAME, FUSION_NAME),
}


def is_moelpr_model(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in MOELPR_MODEL_TYPES


def is_trainable_in_stage(parameter_name: str, moelpr_stage: str, moe_method: str = LPR) -> bool:
    """Whether the MoE parameter ``parameter_name`` trains in this (method, stage)."""
    return any(f".{module}." in parameter_name for module in TRAINABLE_MODULES[(moe_method, moelpr_stage)])


def trainable_parameter_names(model: torch.nn.Module, moelpr_stage: str, train_embeddings: bool) -> set[str]:
    """Names of the parameters that train; with ``train_embeddings`` (MoE-CT) also the input and output
    embeddings, found by identity whatever the family calls them (tied ones are one parameter)."""
    method = model.config.moe_method
    names = {name for name, _ in model.named_parameters() if is_trainable_in_stage(name, moelpr_stage, method)}
    if train_embeddings:
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
        wanted = {id(param) for module in embeddings if module is not None for param in module.parameters()}
        names |= {name for name, param in model.named_parameters() if id(param) in wanted}
    return names


def setup_moelpr_tuning(
    model: torch.nn.Module, moelpr_stage: str, upcast_trainable: bool, train_embeddings: bool = False
) -> None:
    """Train exactly the method's and stage's parameters; every other tensor stays bit-identical."""
    trainable = trainable_parameter_names(model, moelpr_stage, train_embeddings)
    for name, param in model.named_parameters():
        train = name in trainable
        param.requires_grad_(train)
        if train and upcast_trainable:
            param.data = param.data.to(torch.float32)
    modules = TRAINABLE_MODULES[(model.config.moe_method, moelpr_stage)]
    if train_embeddings:
        modules = (*modules, "embeddings", "LM head")
    if not trainable:
        raise ValueError(f"The model has no {modules} parameters to train.")
    method = "MoE-CT" if model.config.moe_method == CT else "MoE-LPR"
    logger.info_rank0(f"Fine-tuning method: {method} {moelpr_stage}, training {modules}.")


def wrap_init_adapter(init_adapter: Callable[..., Any]) -> Callable[..., Any]:
    def init_moelpr_adapter(
        config: Any, model: torch.nn.Module, model_args: Any, finetuning_args: Any, is_trainable: bool
    ) -> torch.nn.Module:
        if finetuning_args.finetuning_type != MOELPR:
            return init_adapter(config, model, model_args, finetuning_args, is_trainable)

        # Read by the model at every forward and saved with the checkpoint's config.
        model.config.router_aux_loss_coef = finetuning_args.aux_loss_coef
        model.config.lpr_loss_coef = finetuning_args.lpr_loss_coef
        model.config.lpr_loss_form = finetuning_args.lpr_loss_form
        if is_trainable:
            # As LLaMA-Factory does: ZeRO-3 keeps fp32 master weights, pure bf16 stays in bf16.
            upcast = not finetuning_args.pure_bf16 and not is_deepspeed_zero3_enabled()
            train_embeddings = bool(finetuning_args.moect_train_embeddings)
            setup_moelpr_tuning(model, finetuning_args.moelpr_stage, upcast, train_embeddings)
        return model

    return init_moelpr_adapter


def wrap_add_z3_leaf_module(add_z3_leaf_module: Callable[[Any], None]) -> Callable[[Any], None]:
    def add_moelpr_z3_leaf_module(model: Any) -> None:
        add_z3_leaf_module(model)
        if is_deepspeed_zero3_enabled() and is_moelpr_model(model):
            # The block picks experts per token: ZeRO-3 must gather it whole, as for LLaMA-Factory's MoEs.
            from llamafactory.model.model_utils.moe import _set_z3_leaf_modules

            _set_z3_leaf_modules(model, list(MOE_BLOCK_CLASSES))

    return add_moelpr_z3_leaf_module
