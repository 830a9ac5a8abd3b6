"""Routing statistics in every training log: trainer_state.json, trainer_log.jsonl and the loss plots."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from llamafactory.extras import logging
from llamafactory.train.callbacks import LogCallback
from llamafactory.train.pt.trainer import CustomTrainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from moelpr.checkpoints.slim import MOE_BASE, is_slim_checkpoint, read_reference, resolve_base, write_reference
from moelpr.checkpoints.streaming import CheckpointReader
from moelpr.models.configuration import CT
from moelpr.models.modeling import micro_batch_share
from moelpr.models.statistics import (
    AUX_LOSS_KEY,
    LM_LOSS_KEY,
    LPR_LOSS_KEY,
    fusion_stat_tensors,
    is_routing_log_key,
    routing_stat_tensors,
    training_log_keys,
)

from .checkpoint_saves import marked_as_saving
from .hparams import MoELPRArgumentError
from .model import is_moelpr_model
from .setting_values import MOELPR

# LLaMA-Factory's library logger: LlamaBoard's log file handler sits on it.
logger = logging.get_logger()


class RoutingMeter:
    """Means of the per-micro-batch routing values since the last log, over all ranks.

    The sums live on the training device and every value arrives as a tensor there, so metering a micro-batch
    never waits for the GPU; the one host transfer is at log time."""

    def __init__(self, num_experts: int, device: torch.device | str) -> None:
        self.keys = training_log_keys(num_experts)
        self._sums = torch.zeros(2, len(self.keys), dtype=torch.float64, device=device)  # row 0: sums, row 1: counts
        self._absent = torch.tensor(float("nan"), dtype=torch.float64, device=device)

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        """A NaN value (or a key left out) is one this micro-batch could not give, and is not counted."""
        device = self._sums.device
        row = torch.stack(
            [
                torch.as_tensor(values[k], dtype=torch.float64, device=device) if k in values else self._absent
                for k in self.keys
            ]
        )
        given = ~row.isnan()
        self._sums[0] += torch.where(given, row, 0.0)
        self._sums[1] += given

    def summary(self, accelerator: Any) -> dict[str, float]:
        """Collective under DDP: every rank must call it at the same step (as Trainer.log is)."""
        sums, self._sums = self._sums, torch.zeros_like(self._sums)
        totals = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        return {key: round(float(s / n), 4) for key, s, n in zip(self.keys, totals[0], totals[1]) if n > 0}


class MoELPRTrainer(CustomTrainer):
    """LLaMA-Factory's pt trainer; with a MoE-LPR model it also logs the losses and routing shares."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        moe = is_moelpr_model(self.model)
        if moe and (self.compute_loss_func is not None or self.label_smoother is not None):
            # The router losses reach the router only through the model's own loss (moelpr/models/routing.py).
            raise MoELPRArgumentError(
                "A MoE-LPR model must be trained on the loss it returns: a custom `compute_loss_func` or label "
                "smoothing computes another loss from the logits, and the router losses would get no gradient."
            )
        self._routing_meter = RoutingMeter(self.model.config.max_num_experts, self.args.device) if moe else None
        # Slim saves refer to the checkpoint this run loaded (docs/checkpoints.md). Other fine-tuning types of an
        # upcycled model (LoRA, full, freeze) save and resume as LLaMA-Factory's own do.
        self._moelpr_run = self.finetuning_args.finetuning_type == MOELPR
        self._saves_slim = self._moelpr_run and not self.finetuning_args.moelpr_save_full
        self._base_checkpoint = self.model.config.name_or_path

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if self._routing_meter is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        inputs = {**inputs, "output_router_logits": True}
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        token_mask, lang_mask = inputs.get("attention_mask"), inputs.get("lang_mask")
        ct = self.model.config.moe_method == CT
        # MoE-CT's expert 0 is a routed copy, not the original FFN: its use shows in the fusion weights instead.
        values = routing_stat_tensors(
            outputs.router_logits,
            self.model.config.num_experts_per_tok,
            token_mask=token_mask,
            lang_mask=None if ct else lang_mask,
        )
        values[AUX_LOSS_KEY] = outputs.aux_loss.detach()
        if ct:
            values.update(fusion_stat_tensors(outputs.ffn_fusion_weights, token_mask, lang_mask))
        else:
            values[LPR_LOSS_KEY] = outputs.lpr_loss.detach()
        # The model scales its LM loss by this micro-batch's share of the step's tokens; undo it so
        # lm_loss reads as a per-token loss whatever the gradient accumulation. No labelled token: 0/0, NaN.
        values[LM_LOSS_KEY] = outputs.lm_loss.detach() / micro_batch_share(inputs["labels"], num_items_in_batch)
        self._routing_meter.add(values)
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self._saves_slim and self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()):
            return super().save_model(output_dir, _internal_call)
        # ZeRO-3 would gather every tensor of the model to save it; a slim save gathers the trained ones only.
        state_dict = gathered_trained_tensors(self.accelerator.unwrap_model(self.model))
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        if not self._saves_slim:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        trained = {name for name, param in model.named_parameters() if param.requires_grad}
        state_dict = model.state_dict() if state_dict is None else state_dict
        super()._save(output_dir, {name: tensor for name, tensor in state_dict.items() if name in trained})
        write_reference(output_dir, self._base_checkpoint, MOE_BASE)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        if not self._moelpr_run:
            return super()._save_checkpoint(model, trial)
        # Resuming skips a checkpoint whose save did not finish (checkpoint_saves.py).
        checkpoint = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with marked_as_saving(checkpoint, self.args.should_save, self.accelerator.wait_for_everyone):
            super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not is_slim_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        reference = read_reference(resume_from_checkpoint)
        base = resolve_base(resume_from_checkpoint, reference)
        loaded = Path(self._base_checkpoint)
        # A Hub id loaded by this run is recorded as such (write_reference).
        same = base.resolve() == loaded.resolve() if loaded.is_dir() else reference.base == self._base_checkpoint
        if not same:
            raise MoELPRArgumentError(
                f"`resume_from_checkpoint: {resume_from_checkpoint}` was trained from {base}, but this run loads "
                f"`model_name_or_path: {self._base_checkpoint}`; resume with the model the run started from."
            )
        # The frozen tensors are the base's, already loaded; the checkpoint holds the trained ones.
        with CheckpointReader(resume_from_checkpoint) as reader:
            result = model.load_state_dict({name: reader.get(name) for name in reader.names()}, strict=False)
        if result.unexpected_keys:
            raise MoELPRArgumentError(
                f"`resume_from_checkpoint: {resume_from_checkpoint}` holds {result.unexpected_keys[0]}, which this "
                "model does not have."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._routing_meter is not None and "loss" in logs:
            logs.update(self._routing_meter.summary(self.accelerator))
        super().log(logs, start_time)


def gathered_trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trained parameters of a ZeRO-3 model, gathered one at a time to the main process (every rank must
    call it); ``None`` on the other ranks."""
    import deepspeed
    import torch.distributed as dist

    main = dist.get_rank() == 0
    state_dict = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param]):
                if main:
                    state_dict[name] = param.detach().cpu().clone()
    return state_dict if main else None


def moelpr_trainer_class(_trainer_class: type) -> type:
    return MoELPRTrainer


class MoELPRLogCallback(LogCallback):
    """LLaMA-Factory's trainer_log.jsonl writer, which keeps a fixed set of keys, plus the routing keys."""

    def __init__(self) -> None:
        super().__init__()
        self._routing_logs: dict[int, dict[str, float]] = {}

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        routing = {k: v for k, v in state.log_history[-1].items() if is_routing_log_key(k)}
        if routing and args.should_save:
            self._routing_logs[state.global_step] = routing
        super().on_log(args, state, control, **kwargs)
        if routing and self.webui_mode and args.should_save:
            # LlamaBoard shows the run's log file, where LogCallback writes a fixed set of keys only.
            logger.info_rank0("{" + ", ".join(f"'{key}': {value:.4f}" for key, value in routing.items()) + "}")

    def _write_log(self, output_dir: str, logs: dict[str, Any]) -> None:
        # Runs later on LogCallback's writer thread, hence the lookup by step rather than "the latest".
        super()._write_log(output_dir, {**logs, **self._routing_logs.pop(logs.get("current_steps"), {})})


def moelpr_log_callback_class(_callback_class: type) -> type:
    return MoELPRLogCallback


def wrap_plot_loss(plot_loss: Callable[..., None]) -> Callable[..., None]:
    def plot_loss_and_routing(save_dictionary: str, keys: list[str] | None = None) -> None:
        with open(os.path.join(save_dictionary, TRAINER_STATE_NAME), encoding="utf-8") as f:
            history = json.load(f)["log_history"]
        routing_keys = sorted({key for entry in history for key in entry if is_routing_log_key(key)})
        plot_loss(save_dictionary, keys=[*(keys or ["loss"]), *routing_keys])

    return plot_loss_and_routing
