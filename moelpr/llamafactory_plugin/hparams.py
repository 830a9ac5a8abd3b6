"""The moelpr YAML keys, added to LLaMA-Factory's argument dataclasses, and the checks that need them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from llamafactory.extras.misc import has_tokenized_data
from llamafactory.hparams import DataArguments, FinetuningArguments, ModelArguments, TrainingArguments
from llamafactory.hparams.parser import read_args

from moelpr.errors import MoELPRUserError
from moelpr.extras import require
from moelpr.models.configuration import CT, LPR, LPR_LOSS_FORMS, METHOD_NAMES, PAPER

from .checkpoint_saves import is_incomplete, last_complete_checkpoint
from .data import LANG_MASK
from .model import MOELPR_MODEL_TYPES
from .setting_values import LANGUAGES, MOELPR, OLD, POST_PRETRAIN, REVIEW

# What the user writes for each method (``moelpr_method``), by the checkpoint's ``moe_method``.
METHOD_KEYS = {method: key for key, method in METHOD_NAMES.items()}


class MoELPRArgumentError(MoELPRUserError, ValueError):
    """A moelpr setting that cannot train correctly; the CLI prints it as one line (see :func:`one_line_errors`)."""


# The paper's settings: stage 1 balances the load, stage 2 pulls old-language tokens to expert 0.
DEFAULT_AUX_LOSS_COEF = {POST_PRETRAIN: 0.01, REVIEW: 0.0}
DEFAULT_LPR_LOSS_COEF = {POST_PRETRAIN: 0.0, REVIEW: 0.1}


@dataclass
class MoELPRFinetuningArguments(FinetuningArguments):
    finetuning_type: Literal["lora", "oft", "freeze", "full", "moelpr"] = field(
        default="lora",
        metadata={"help": "Which fine-tuning method to use; `moelpr` trains an upcycled MoE-LPR model."},
    )
    moelpr_method: Literal["moe_lpr", "moe_ct"] | None = field(
        default=None,
        metadata={
            "help": (
                "The method the checkpoint was upcycled for (`moelpr upcycle --method`): `moe_lpr` or `moe_ct`. "
                "Optional: the checkpoint's config says it; when given, it must match."
            )
        },
    )
    moelpr_stage: Literal["post_pretrain", "review"] | None = field(
        default=None,
        metadata={
            "help": (
                "MoE-LPR stage: `post_pretrain` (stage 1) trains the new experts and the routers on new-language "
                "text; `review` (stage 2, the original code's `train_only_router`) trains only the routers with "
                "the LPR loss. Default: post_pretrain."
            )
        },
    )
    aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the load-balancing loss. Default: 0.01 in post_pretrain, 0 in review."},
    )
    lpr_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the LPR loss (MoE-LPR's review stage only). Default: 0.1 in review."},
    )
    lpr_loss_form: str | None = field(
        default=None,
        metadata={
            "help": (
                "`paper` (default): the LPR loss is the cross-entropy of the router logits toward expert 0, the "
                "paper's formula; `authors`: the cross-entropy of the router's softmax outputs, as the authors' "
                "code computes it (a second softmax: a several times weaker router gradient at the same weight)."
            )
        },
    )
    moect_train_embeddings: bool | None = field(
        default=None,
        metadata={
            "help": (
                "MoE-CT only: also train the token embeddings and the LM head, as the paper does. Default: true; "
                "false keeps them frozen (then only the routed experts, routers and fusion layers train)."
            )
        },
    )

    moelpr_save_full: bool = field(
        default=False,
        metadata={
            "help": (
                "Save whole checkpoints (every tensor of the model) in the output and every `checkpoint-N`. Default: "
                "slim ones, holding the tensors this stage trains and a reference to `model_name_or_path` "
                "(docs/checkpoints.md); every tool loads both alike."
            )
        },
    )

    def __post_init__(self) -> None:
        if self.finetuning_type != MOELPR:
            moelpr_keys = (
                "moelpr_method",
                "moelpr_stage",
                "aux_loss_coef",
                "lpr_loss_coef",
                "lpr_loss_form",
                "moect_train_embeddings",
            )
            given = [key for key in moelpr_keys if getattr(self, key) is not None]
            if given:
                raise MoELPRArgumentError(
                    f"{', '.join(f'`{k}`' for k in given)} only apply with `finetuning_type: moelpr`."
                )
            super().__post_init__()
            return

        # LLaMA-Factory asserts a closed list of methods; its checks of the other options treat
        # moelpr like full tuning (a plain model, no adapter), so run them as such.
        self.finetuning_type = "full"
        try:
            super().__post_init__()
        finally:
            self.finetuning_type = MOELPR

        self.moelpr_stage = self.moelpr_stage or POST_PRETRAIN
        if self.aux_loss_coef is None:
            self.aux_loss_coef = DEFAULT_AUX_LOSS_COEF[self.moelpr_stage]
        if self.lpr_loss_coef is None:
            self.lpr_loss_coef = DEFAULT_LPR_LOSS_COEF[self.moelpr_stage]
        if self.aux_loss_coef < 0 or self.lpr_loss_coef < 0:
            raise MoELPRArgumentError("`aux_loss_coef` and `lpr_loss_coef` must not be negative.")
        self.lpr_loss_form = self.lpr_loss_form or PAPER
        if self.lpr_loss_form not in LPR_LOSS_FORMS:
            raise MoELPRArgumentError(
                f"`lpr_loss_form` must be one of {', '.join(LPR_LOSS_FORMS)}, got {self.lpr_loss_form!r}."
            )


@dataclass
class MoELPRDataArguments(DataArguments):
    generate_lang_mask: bool = field(
        default=False,
        metadata={
            "help": (
                "Tag every token with its dataset's `language` from dataset_info.json (1 = old) and feed the "
                "mask to the model as `lang_mask`. Required by the review stage."
            )
        },
    )


_EXTENDED = {FinetuningArguments: MoELPRFinetuningArguments, DataArguments: MoELPRDataArguments}


def extend_argument_classes(argument_classes: list[type]) -> list[type]:
    """LLaMA-Factory's list of argument dataclasses with the moelpr-extended ones in their place."""
    return [_EXTENDED.get(cls, cls) for cls in argument_classes]


def dataset_languages(dataset_names: list[str] | None, dataset_dir: str) -> dict[str, str | None]:
    """``language`` of each named dataset in dataset_info.json (``None`` where it has none)."""
    from llamafactory.data.parser import get_dataset_list

    names = dataset_names or []
    return {name: attr.language for name, attr in zip(names, get_dataset_list(names, dataset_dir))}


def _check_model_is_moelpr(model_args: ModelArguments) -> Any:
    """The checkpoint's config, once it is known to be an unquantized upcycled model."""
    from llamafactory.model.loader import load_config

    config = load_config(model_args)
    model_type = getattr(config, "model_type", None)
    if getattr(config, "quantization_config", None) is not None:
        raise MoELPRArgumentError(
            f"{model_args.model_name_or_path} is a quantized checkpoint; moelpr keeps the original weights "
            "bit-identical and trains the new ones in full precision, so upcycle and train an unquantized model."
        )
    if model_type not in MOELPR_MODEL_TYPES:
        raise MoELPRArgumentError(
            f"`finetuning_type: moelpr` trains an upcycled MoE-LPR model, but {model_args.model_name_or_path} is "
            f"a {model_type!r} model. Upcycle it first (`moelpr upcycle --model_path {model_args.model_name_or_path} "
            "--output_path <moe_dir> --num_experts 4 --topk 2`) and set `model_name_or_path: <moe_dir>`."
        )
    return config


def _check_method_settings(finetuning_args: MoELPRFinetuningArguments, method: str, model_path: str) -> None:
    """Check the method's keys against the checkpoint's ``moe_method`` and resolve ``moelpr_method`` and
    ``moect_train_embeddings``."""
    key = METHOD_KEYS[method]
    name = {LPR: "MoE-LPR", CT: "MoE-CT"}[method]
    if finetuning_args.moelpr_method not in (None, key):
        raise MoELPRArgumentError(
            f"`moelpr_method: {finetuning_args.moelpr_method}` needs a checkpoint upcycled with `moelpr upcycle "
            f"--method {finetuning_args.moelpr_method}`, but {model_path} is a {name} checkpoint (its config.json "
            f"says `moe_method: {method}`); set `moelpr_method: {key}` or upcycle the dense model again."
        )
    finetuning_args.moelpr_method = key
    if method == LPR:
        if finetuning_args.moect_train_embeddings is not None:
            raise MoELPRArgumentError(
                f"`moect_train_embeddings` applies to MoE-CT checkpoints, but {model_path} is a MoE-LPR checkpoint, "
                "whose embeddings always stay frozen; remove the key."
            )
        if finetuning_args.moelpr_stage == POST_PRETRAIN and finetuning_args.lpr_loss_coef:
            raise MoELPRArgumentError(
                "`lpr_loss_coef` applies to the review stage only: post-pretraining (stage 1) sees new-language "
                "text and trains the new experts; set `moelpr_stage: review` for the LPR loss, or drop the key."
            )
        return
    if finetuning_args.moelpr_stage == REVIEW:
        raise MoELPRArgumentError(
            f"{model_path} is a MoE-CT checkpoint, which has one training stage (`moelpr_stage: post_pretrain`, the "
            "default); `moelpr_stage: review` is MoE-LPR's router-only stage."
        )
    if finetuning_args.lpr_loss_coef:
        raise MoELPRArgumentError(
            f"`lpr_loss_coef` is MoE-LPR's loss (old-language tokens to the original FFN as expert 0), but {model_path} "
            "is a MoE-CT checkpoint, whose original FFN is always active outside the router; remove the key."
        )
    if finetuning_args.moect_train_embeddings is None:
        finetuning_args.moect_train_embeddings = True


def _check_dataset_languages(data_args: MoELPRDataArguments, review: bool) -> None:
    train = dataset_languages(data_args.dataset, data_args.dataset_dir)
    languages = {**train, **dataset_languages(data_args.eval_dataset, data_args.dataset_dir)}
    unknown = {name: lang for name, lang in languages.items() if lang is not None and lang not in LANGUAGES}
    if unknown:
        raise MoELPRArgumentError(
            f'Unknown `language` in dataset_info.json: {unknown}. Use "old" for a language the model already '
            'knows or "new" for one it is being taught.'
        )
    missing = [name for name, lang in languages.items() if lang is None]
    if data_args.generate_lang_mask and missing:
        raise MoELPRArgumentError(
            f'`generate_lang_mask: true` needs `"language": "old"` or `"new"` on every dataset in '
            f"dataset_info.json; it is missing on: {', '.join(missing)}."
        )
    if review and OLD not in train.values():
        raise MoELPRArgumentError(
            "The review stage trains the routers to send old-language tokens to expert 0, so it needs at least one "
            f'training dataset marked `"language": "old"` in dataset_info.json; got {train or "none"}.'
        )


def _check_tokenized_languages(data_args: MoELPRDataArguments, review: bool) -> None:
    """Languages of a dataset tokenized earlier: dataset_info.json may have changed since, so read the saved mask."""
    import pyarrow.compute as pc
    from datasets import load_from_disk

    if not data_args.generate_lang_mask:
        return
    saved = load_from_disk(data_args.tokenized_path)
    train = saved["train"] if "train" in saved else None
    if train is None or LANG_MASK not in train.column_names:
        raise MoELPRArgumentError(
            f"The dataset tokenized in `tokenized_path` ({data_args.tokenized_path}) has no `{LANG_MASK}`: it was "
            "tokenized without `generate_lang_mask: true`; tokenize it again with it."
        )
    if review and not any(
        pc.max(pc.list_flatten(chunk)).as_py() for chunk in train.data.column(LANG_MASK).chunks if len(chunk)
    ):
        raise MoELPRArgumentError(
            f"The review stage needs old-language tokens, but the dataset tokenized in `tokenized_path` "
            f"({data_args.tokenized_path}) has none (its `{LANG_MASK}` is 0 everywhere): tokenize a replay mix "
            'that includes a dataset marked `"language": "old"`.'
        )


def _unsafe_options(
    model_args: ModelArguments,
    data_args: MoELPRDataArguments,
    training_args: TrainingArguments,
    finetuning_args: MoELPRFinetuningArguments,
) -> list[str]:
    """LLaMA-Factory options that would silently break MoE-LPR's promises, each with the reason."""
    unsafe = []
    if model_args.train_from_scratch:
        unsafe.append(
            "`train_from_scratch` re-initialises every weight, including the frozen original FFN (expert 0) that "
            "MoE-LPR keeps; moelpr trains an upcycled pretrained model."
        )
    tokens = {"resize_vocab": model_args.resize_vocab, "add_tokens": model_args.add_tokens}
    tokens |= {"add_special_tokens": model_args.add_special_tokens}
    tokens |= {"new_special_tokens_config": model_args.new_special_tokens_config}
    given = [f"`{key}`" for key, value in tokens.items() if value]
    if given:
        unsafe.append(
            f"{', '.join(given)} would add embedding rows after upcycling: MoE-LPR keeps the embeddings frozen, so "
            "the new tokens would never be learned, and moelpr keeps the vocabulary of the upcycled checkpoint for "
            "MoE-CT as well; extend the tokenizer (and the dense model's embeddings) before upcycling instead."
        )
    if training_args.label_smoothing_factor:
        unsafe.append(
            "`label_smoothing_factor` makes the trainer compute its own loss from the logits, which drops the "
            "router losses (and fails on the missing labels); remove it."
        )
    if training_args.push_to_hub and not finetuning_args.moelpr_save_full:
        unsafe.append(
            "`push_to_hub` would upload slim checkpoints, which hold only the tensors this stage trains and refer to "
            "their base on this machine: set `moelpr_save_full: true` to push whole checkpoints, or train without "
            "pushing, run `moelpr merge` on the output and upload the merged directory."
        )
    if data_args.dataset_dir == "ONLINE":
        unsafe.append(
            '`dataset_dir: ONLINE` has no dataset_info.json to say each dataset\'s `"language"`; register the '
            "corpora in a local dataset_info.json."
        )
    if model_args.quantization_bit is not None:
        unsafe.append("`quantization_bit` quantizes the frozen weights, so they would no longer stay bit-identical.")
    if model_args.upcast_layernorm:
        unsafe.append(
            "`upcast_layernorm` casts the frozen norm weights to float32, so they would be saved changed; remove it."
        )
    if model_args.mixture_of_depths is not None:
        unsafe.append("`mixture_of_depths` rewrites the decoder layers that hold the MoE blocks; remove it.")
    if finetuning_args.use_badam:
        unsafe.append("BAdam changes which parameters train, which breaks the moelpr freeze rules.")
    return unsafe


def check_moelpr_args(
    model_args: ModelArguments,
    data_args: MoELPRDataArguments,
    training_args: TrainingArguments,
    finetuning_args: MoELPRFinetuningArguments,
) -> None:
    """Reject moelpr settings that cannot train correctly, before anything is loaded."""
    resume = training_args.resume_from_checkpoint
    if resume and is_incomplete(resume):  # only moelpr runs mark their saves (checkpoint_saves.py)
        last = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume)))
        raise MoELPRArgumentError(
            f"`resume_from_checkpoint: {resume}` is incomplete: its run stopped while saving it. Resume from "
            f"{last or 'an earlier checkpoint'}, or start again with the same command and no "
            "`resume_from_checkpoint` to resume from the last complete checkpoint."
        )
    if finetuning_args.finetuning_type != MOELPR:
        if data_args.generate_lang_mask:
            raise MoELPRArgumentError("`generate_lang_mask` only applies with `finetuning_type: moelpr`.")
        return

    if finetuning_args.stage != "pt":
        raise MoELPRArgumentError(
            f"`finetuning_type: moelpr` runs with `stage: pt` (both MoE-LPR stages train on raw documents), "
            f"got `stage: {finetuning_args.stage}`."
        )
    if model_args.moe_aux_loss_coef is not None:
        raise MoELPRArgumentError("With `finetuning_type: moelpr`, set the load-balancing weight with `aux_loss_coef`.")
    unsafe = _unsafe_options(model_args, data_args, training_args, finetuning_args)
    if unsafe:
        raise MoELPRArgumentError(" ".join(unsafe))

    config = _check_model_is_moelpr(model_args)
    _check_method_settings(finetuning_args, getattr(config, "moe_method", LPR), model_args.model_name_or_path)
    review = finetuning_args.moelpr_stage == REVIEW
    if review and not data_args.generate_lang_mask:
        raise MoELPRArgumentError(
            "The review stage (`moelpr_stage: review`) applies the LPR loss to old-language tokens, which needs "
            "the language mask: set `generate_lang_mask: true`."
        )
    if data_args.tokenized_path and has_tokenized_data(data_args.tokenized_path):
        _check_tokenized_languages(data_args, review)
    else:
        _check_dataset_languages(data_args, review)


def wrap_parse_train_args(parse: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
    def parse_train_args(args: dict[str, Any] | list[str] | None = None) -> tuple[Any, ...]:
        args = read_args(args)  # the recipe, as LLaMA-Factory's parser reads it
        if isinstance(args, dict) and args.get("finetuning_type") == MOELPR and args.get("deepspeed"):
            # Before parsing: transformers' arguments fail on a DeepSpeed config without DeepSpeed, in a traceback.
            require("deepspeed", purpose="a moelpr recipe with `deepspeed:`")
        model_args, data_args, training_args, finetuning_args, generating_args = parse(args)
        check_moelpr_args(model_args, data_args, training_args, finetuning_args)
        return model_args, data_args, training_args, finetuning_args, generating_args

    return parse_train_args
