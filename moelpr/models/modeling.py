"""What every ``*_moelpr`` causal LM adds to its dense family's causal LM."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..checkpoints.slim import HUB_OPTIONS, ComposedCheckpoint, find_slim_checkpoint
from .configuration import CT
from .moe import MoELPRSparseBlock
from .moe_ct import MoECTBlock
from .routing import (
    ROUTING_KWARG,
    LossScale,
    RoutingContext,
    enter_decoder_layer,
    exit_decoder_layer,
    probe_loss_scale,
)

IGNORE_INDEX = -100

# Every MoE block class a ``*_moelpr`` model may hold (one per method).
MOE_BLOCK_CLASSES = (MoELPRSparseBlock, MoECTBlock)


@dataclass
class MoELPRCausalLMOutputWithPast(CausalLMOutputWithPast):
    """In training, ``loss`` is ``lm_loss`` plus the coefficient-weighted ``aux_loss`` (load balancing) and
    ``lpr_loss``; in evaluation (``model.eval()``) it is ``lm_loss`` alone.

    ``aux_loss`` and ``lpr_loss`` (given labels; MoE-CT has no ``lpr_loss``) are unweighted means over MoE layers;
    ``router_logits`` holds one ``[batch * seq_len, num_experts]`` tensor per MoE layer when router logits are asked
    for, and for MoE-CT ``ffn_fusion_weights`` one ``[batch * seq_len]`` float32 tensor per MoE layer: each token's
    fusion weight on the frozen FFN.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    lpr_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    ffn_fusion_weights: tuple[torch.Tensor, ...] | None = None


def micro_batch_share(labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | float:
    """Share of the optimizer step's predicted tokens that this micro-batch holds.

    When the trainer passes ``num_items_in_batch`` it normalises the LM loss by the tokens of the whole
    (accumulated) step instead of dividing each micro-batch's mean; router losses, which are per-batch
    means, get the same treatment so their weight does not grow with gradient accumulation. A 0-dim tensor on
    the labels' device (never read on the host: no sync in the training step).
    """
    if num_items_in_batch is None:
        return 1.0
    # Counted as the trainer counts ``num_items_in_batch`` (unshifted labels), so shares sum to one.
    labelled = (labels != IGNORE_INDEX).sum().float()
    return labelled / torch.as_tensor(num_items_in_batch, device=labels.device).float().clamp(min=1.0)


class MoELPRForCausalLMMixin:
    """Turns a family's ``...ForCausalLM`` into its MoE-LPR form.

    A concrete class lists this mixin first, then the dense causal LM, and names the family's FFN
    class as ``expert_class``: the chosen layers' ``mlp`` become the MoE block of the config's method
    (:class:`MoELPRSparseBlock` or :class:`MoECTBlock`).
    """

    expert_class: type[nn.Module]

    def __init__(self, config) -> None:
        super().__init__(config)
        for layer_idx in config.moe_layer_indices:
            self.model.layers[layer_idx].mlp = self.make_moe_block(config, layer_idx)
        for layer in self.model.layers:
            # Every layer: the routing context must not reach the attention code as an unknown argument.
            layer.register_forward_pre_hook(enter_decoder_layer, with_kwargs=True)
            layer.register_forward_hook(exit_decoder_layer, always_call=True)
        # Again, now that the MoE blocks exist: initialise their weights and register them.
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``; a slim checkpoint (docs/checkpoints.md) loads as the whole model it
        stands for, whether a directory or a Hub id (``subfolder`` too): its chain of bases is resolved and checked
        first, then every tensor is read from the checkpoint of the chain that holds it, with the caller's ``dtype``,
        ``device_map`` and other options."""
        hub_options = {key: kwargs[key] for key in HUB_OPTIONS if kwargs.get(key) is not None}
        path = None
        if pretrained_model_name_or_path is not None:
            # A directory or a Hub id, and a subfolder of it, as transformers resolves them.
            path = find_slim_checkpoint(pretrained_model_name_or_path, kwargs.get("subfolder") or "", **hub_options)
        if path is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        kwargs.pop("subfolder", None)  # path is the subfolder
        config = kwargs.pop("config", None)
        if config is None:
            config, kwargs = cls.config_class.from_pretrained(path, return_unused_kwargs=True, **kwargs)
        with ComposedCheckpoint(path, **hub_options) as checkpoint, ExitStack() as files:
            state_dict = checkpoint.lazy_state_dict(files)
            if is_deepspeed_zero3_enabled():  # ZeRO-3's loader takes tensors, not slices
                state_dict = {name: value[:] for name, value in state_dict.items()}
            loaded = super().from_pretrained(None, *model_args, config=config, state_dict=state_dict, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.config.name_or_path = model.name_or_path = str(pretrained_model_name_or_path)
        if model.can_generate() and (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        return loaded

    @classmethod
    def moe_block_class(cls, config) -> type[MoELPRSparseBlock] | type[MoECTBlock]:
        """The MoE block class of ``config``'s method (the upcycler asks it for the block's tensors)."""
        return MoECTBlock if config.moe_method == CT else MoELPRSparseBlock

    def make_moe_block(self, config, layer_idx: int) -> nn.Module:
        return self.moe_block_class(config)(config, config.num_experts_of(layer_idx), lambda: self.expert_class(config))

    def moe_blocks(self) -> list[MoELPRSparseBlock | MoECTBlock]:
        return [m for m in self.modules() if isinstance(m, MOE_BLOCK_CLASSES)]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        lang_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoELPRCausalLMOutputWithPast:
        r"""
        lang_mask: ``[batch, seq_len]``, 1 on original-language ("old") tokens. Old-language tokens get
            the LPR loss toward expert 0; without a mask no token does.
        output_router_logits: return the router logits of every MoE layer (default: the config's), and for
            MoE-CT the fusion weights on the frozen FFN.
        """
        config = self.config
        if output_router_logits is None:
            output_router_logits = config.output_router_logits
        compute_losses = labels is not None
        context = None
        if compute_losses or output_router_logits:
            inputs = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            batch, seq_len = inputs.shape[:2]
            context = RoutingContext(
                token_mask=_flat_token_mask(attention_mask, seq_len),
                lang_mask=_flat_lang_mask(lang_mask, batch, seq_len),
                compute_losses=compute_losses,
                lpr_loss_form=config.lpr_loss_form,
            )
            kwargs[ROUTING_KWARG] = context
        # The authors add the router losses to the loss only when training: in evaluation the loss (hence
        # LLaMA-Factory's eval_loss and eval_perplexity) is the LM loss, and the router losses are reported
        # beside it.
        train_router = compute_losses and self.training
        share = 1.0
        if train_router:
            share = micro_batch_share(labels, kwargs.get("num_items_in_batch"))
            num_moe_layers = len(config.moe_layer_indices)
            context.loss_weights = (
                config.router_aux_loss_coef * share / num_moe_layers,
                config.lpr_loss_coef * share / num_moe_layers,
            )
            context.loss_scale = LossScale()

        outputs = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

        records = context.records if context is not None else []
        aux_loss = lpr_loss = None
        if compute_losses:
            aux_loss = torch.stack([r.balance_loss for r in records]).mean()
            if config.moe_method != CT:
                lpr_loss = torch.stack([r.lpr_loss for r in records]).mean()
        loss = lm_loss = outputs.loss
        if train_router:
            # The router-loss values are added detached: their gradients were already injected inside
            # the MoE blocks (see routing.py), scaled by whatever reaches this loss through the probe.
            weighted = config.router_aux_loss_coef * aux_loss
            if lpr_loss is not None:
                weighted = weighted + config.lpr_loss_coef * lpr_loss
            weighted = share * weighted
            loss = lm_loss + weighted.to(lm_loss.dtype) + probe_loss_scale(lm_loss, context.loss_scale)
        return MoELPRCausalLMOutputWithPast(
            loss=loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            lpr_loss=lpr_loss,
            router_logits=tuple(r.router_logits for r in records) if output_router_logits else None,
            ffn_fusion_weights=(
                tuple(r.ffn_weight for r in records) if output_router_logits and config.moe_method == CT else None
            ),
        )


def _flat_token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """Non-padding tokens of this forward as a flat bool mask; ``None`` means all count.

    A 2D mask may be longer than the inputs during cached generation; its last ``seq_len`` columns are
    the current tokens. Packed-sequence masks hold segment ids, so any non-zero value is a token.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return (attention_mask[:, -seq_len:] != 0).reshape(-1)


def _flat_lang_mask(lang_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    if lang_mask is None:
        return None
    if tuple(lang_mask.shape) != (batch, seq_len):
        raise ValueError(
            f"lang_mask must have the shape of input_ids ({batch}, {seq_len}), got {tuple(lang_mask.shape)}."
        )
    return lang_mask.reshape(-1).bool()
