"""LLaMA-Factory plugin: ``finetuning_type: moelpr`` for ``llamafactory-cli train``.

LLaMA-Factory has no plugin interface, so :func:`apply` replaces a handful of its functions and
classes at the narrowest points that see what MoE-LPR needs (listed in :func:`_patch_table`). Every
patch targets the LLaMA-Factory and transformers releases of ``PLUGIN_RELEASES``; :func:`apply` refuses any
other release instead of patching code it has not been checked against.

The ``moelpr-startup.pth`` startup hook installed with the package calls :func:`apply` as soon as
``llamafactory.train.tuner`` is imported, so the plain ``llamafactory-cli`` (and the ``torchrun``
workers it launches) pick the plugin up without a wrapper command, and :func:`apply_webui` as soon as
LlamaBoard's ``llamafactory.webui.interface`` is imported (``llamafactory-cli webui``). With other releases
the hook calls neither and LLaMA-Factory runs without moelpr (see ``_moelpr_startup_hook``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any

# The startup hook's module (installed with moelpr) holds the checked releases: it decides without importing moelpr.
from _moelpr_startup_hook import PLUGIN_RELEASES, plugin_releases, releases_outside_plugin_ranges

from ..errors import MoELPRUserError

_applied = False
_webui_applied = False


class UnsupportedReleaseError(MoELPRUserError):
    """The installed LLaMA-Factory or transformers is a release the plugin was not checked against."""


def check_releases() -> None:
    """Raise :class:`UnsupportedReleaseError` unless the installed releases are those of ``PLUGIN_RELEASES``."""
    outside = releases_outside_plugin_ranges()
    if outside:
        raise UnsupportedReleaseError(
            f"moelpr's LLaMA-Factory plugin supports {plugin_releases()}, and {', '.join(outside)} is installed"
        )


def _patch_table() -> list[tuple[str, str, Callable[[Any], Any]]]:
    """(module, attribute, original -> replacement) for every patched LLaMA-Factory name.

    Names bound with ``from x import y`` are patched in the module that calls them, not where they
    are defined, so only the call sites MoE-LPR needs change.
    """
    from . import checkpoint_saves, data, hparams, model, trainer

    return [
        # Argument parsing: the moelpr keys and the checks that need all argument groups.
        ("llamafactory.hparams.parser", "_TRAIN_ARGS", hparams.extend_argument_classes),
        ("llamafactory.hparams.parser", "_INFER_ARGS", hparams.extend_argument_classes),
        ("llamafactory.hparams.parser", "_EVAL_ARGS", hparams.extend_argument_classes),
        ("llamafactory.hparams.parser", "_parse_train_args", hparams.wrap_parse_train_args),
        # A run started again resumes from its last checkpoint whose save finished (checkpoint_saves.py).
        ("llamafactory.hparams.parser", "get_last_checkpoint", checkpoint_saves.wrap_get_last_checkpoint),
        # Data: the dataset's language travels with each row, then with each token through packing; packed
        # blocks start with bos for tokenizers that add one (transformers 5 hides that from LLaMA-Factory).
        ("llamafactory.data.parser", "DatasetAttr.join", data.wrap_dataset_attr_join),
        ("llamafactory.data.converter", "get_dataset_converter", data.wrap_get_dataset_converter),
        (
            "llamafactory.data.processor.pretrain",
            "PretrainDatasetProcessor.preprocess_dataset",
            data.wrap_pretrain_preprocess,
        ),
        ("llamafactory.train.pt.workflow", "DataCollatorForLanguageModeling", data.lang_mask_collator_class),
        # A pre-training stage saves no chat template where its tokenizer had none (LLaMA-Factory's placeholder
        # would break the next stage for tokenizers that add bos).
        ("llamafactory.train.pt.workflow", "get_template_and_fix_tokenizer", data.wrap_get_template_and_fix_tokenizer),
        # Model: stage freeze rules and router-loss weights; ZeRO-3 leaf module.
        ("llamafactory.model.loader", "init_adapter", model.wrap_init_adapter),
        ("llamafactory.model.patcher", "add_z3_leaf_module", model.wrap_add_z3_leaf_module),
        # Training: routing statistics in the logs, trainer_log.jsonl and the loss plots.
        ("llamafactory.train.pt.workflow", "CustomTrainer", trainer.moelpr_trainer_class),
        ("llamafactory.train.pt.workflow", "plot_loss", trainer.wrap_plot_loss),
        ("llamafactory.train.tuner", "LogCallback", trainer.moelpr_log_callback_class),
    ]


def _webui_patch_table() -> list[tuple[str, str, Callable[[Any], Any]]]:
    """(module, attribute, original -> replacement) for LlamaBoard (imports gradio, so kept apart from training)."""
    from . import webui

    return [
        ("llamafactory.webui.components.top", "METHODS", webui.add_method),
        ("llamafactory.webui.locales", "LOCALES", webui.add_locales),
        # The moelpr panel in the Train tab, recipe defaults, dataset languages in the picker.
        ("llamafactory.webui.interface", "create_train_tab", webui.wrap_create_train_tab),
        ("llamafactory.webui.components.train", "list_datasets", webui.wrap_list_datasets),
        # The panel's keys in the previewed and saved YAML; the plugin's argument errors before a run starts.
        ("llamafactory.webui.runner", "Runner._parse_train_args", webui.wrap_runner_parse_train_args),
        ("llamafactory.webui.runner", "Runner._initialize", webui.wrap_runner_initialize),
        ("llamafactory.webui.common", "_clean_cmd", webui.wrap_clean_cmd),
    ]


def _print_argument_errors_in_one_line() -> None:
    """A moelpr setting the user must change is reported as one line, not as a stack trace; every other
    uncaught exception keeps the usual traceback."""
    previous_hook = sys.excepthook

    def excepthook(exc_type: type[BaseException], exc: BaseException, traceback: Any) -> None:
        # A bad setting, a slim checkpoint's missing or changed base (docs/checkpoints.md), a missing extra and a full
        # disk are all the user's to fix.
        if issubclass(exc_type, MoELPRUserError):
            print(f"[moelpr] error: {exc}", file=sys.stderr)
        else:
            previous_hook(exc_type, exc, traceback)

    sys.excepthook = excepthook


def apply() -> None:
    """Install the plugin into the imported LLaMA-Factory; safe to call more than once."""
    global _applied
    if _applied:
        return
    check_releases()
    # Set before patching: importing llamafactory.train.tuner below fires the startup hook, which
    # calls apply() again.
    _applied = True
    _print_argument_errors_in_one_line()
    _install(_patch_table())


def apply_webui() -> None:
    """Add moelpr to the imported LlamaBoard (and :func:`apply` the training plugin); safe to call more than once."""
    global _webui_applied
    if _webui_applied:
        return
    apply()
    _webui_applied = True
    _install(_webui_patch_table())


def _install(table: list[tuple[str, str, Callable[[Any], Any]]]) -> None:
    for module_name, attribute, make_replacement in table:
        owner = import_module(module_name)
        *owner_path, name = attribute.split(".")
        for part in owner_path:
            owner = getattr(owner, part)
        setattr(owner, name, make_replacement(getattr(owner, name)))


__all__ = ["PLUGIN_RELEASES", "UnsupportedReleaseError", "apply", "apply_webui", "check_releases"]
