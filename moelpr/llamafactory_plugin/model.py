"""What ``finetuning_type: moelpr`` does to the loaded model: freeze rules, loss weights, ZeRO-3 leaf."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from llamafactory.extras import logging
from transformers.integrations import is_deepspeed_zero3_enabled

from moelpr.models import MOE_FAMILIES, MoELPRSparseBlock
from moelpr.models.moe import NEW_EXPERTS_NAME, ROUTER_NAME

from .hparams import MOELPR, POST_PRETRAIN, REVIEW

logger = logging.get_logger(__name__)

MOELPR_MODEL_TYPES = frozenset(config_class.model_type for config_class, _ in MOE_FAMILIES.values())

# Stage 1 grows the new experts (and learns to route to them); stage 2 only re-learns routing.
TRAINABLE_MODULES = {POST_PRETRAIN: (ROUTER_NAME, NEW_EXPERTS_NAME), REVIEW: (ROUTER_NAME,)}


def is_moelpr_model(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in MOELPR_MODEL_TYPES


def is_trainable_in_stage(parameter_name: str, moelpr_stage: str) -> bool:
    return any(f".{module}." in parameter_name for module in TRAINABLE_MODULES[moelpr_stage])


def setup_moelpr_tuning(model: torch.nn.Module, moelpr_stage: str, upcast_trainable: bool) -> None:
    """Train exactly the stage's modules; every other tensor stays bit-identical."""
    trainable = 0
    for name, param in model.named_parameters():
        train = is_trainable_in_stage(name, moelpr_stage)
        param.requires_grad_(train)
        if train:
            trainable += 1
            if upcast_trainable:
                param.data = param.data.to(torch.float32)
    if trainable == 0:
        raise ValueError(f"The model has no {TRAINABLE_MODULES[moelpr_stage]} parameters to train.")
    logger.info_rank0(f"Fine-tuning method: MoE-LPR {moelpr_stage}, training {TRAINABLE_MODULES[moelpr_stage]}.")


def wrap_init_adapter(init_adapter: Callable[..., Any]) -> Callable[..., Any]:
    def init_moelpr_adapter(
        config: Any, model: torch.nn.Module, model_args: Any, finetuning_args: Any, is_trainable: bool
    ) -> torch.nn.Module:
        if finetuning_args.finetuning_type != MOELPR:
            return init_adapter(config, model, model_args, finetuning_args, is_trainable)

        # Read by the model at every forward and saved with the checkpoint's config.
        model.config.router_aux_loss_coef = finetuning_args.aux_loss_coef
        model.config.lpr_loss_coef = finetuning_args.lpr_loss_coef
        if is_trainable:
            # As LLaMA-Factory does: ZeRO-3 keeps fp32 master weights, pure bf16 stays in bf16.
            upcast = not finetuning_args.pure_bf16 and not is_deepspeed_zero3_enabled()
            setup_moelpr_tuning(model, finetuning_args.moelpr_stage, upcast)
        return model

    return init_moelpr_adapter


def wrap_add_z3_leaf_module(add_z3_leaf_module: Callable[[Any], None]) -> Callable[[Any], None]:
    def add_moelpr_z3_leaf_module(model: Any) -> None:
        add_z3_leaf_module(model)
        if is_deepspeed_zero3_enabled() and is_moelpr_model(model):
            # The block picks experts per token: ZeRO-3 must gather it whole, as for LLaMA-Factory's MoEs.
            from llamafactory.model.model_utils.moe import _set_z3_leaf_modules

            _set_z3_leaf_modules(model, [MoELPRSparseBlock])

    return add_moelpr_z3_leaf_module
