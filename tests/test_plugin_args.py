"""Bad moelpr settings are refused with one clear message while the arguments are parsed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from llamafactory.hparams import get_train_args

import moelpr.llamafactory_plugin as plugin
from moelpr.llamafactory_plugin.hparams import MoELPRArgumentError

plugin.apply()  # what the startup hook does in llamafactory-cli

REPO_DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture()
def base_args(upcycled_llama_dir, tmp_path) -> dict:
    return {
        "model_name_or_path": str(upcycled_llama_dir),
        "stage": "pt",
        "do_train": True,
        "finetuning_type": "moelpr",
        "dataset": "new_hu,old_en",
        "dataset_dir": str(REPO_DATA),
        "cutoff_len": 32,
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": "none",
    }


def test_valid_stages_resolve_the_paper_defaults(base_args):
    *_, stage1, _ = get_train_args(base_args)
    assert (stage1.moelpr_stage, stage1.aux_loss_coef, stage1.lpr_loss_coef) == ("post_pretrain", 0.01, 0.0)
    _, data_args, _, stage2, _ = get_train_args({**base_args, "moelpr_stage": "review", "generate_lang_mask": True})
    assert (stage2.moelpr_stage, stage2.aux_loss_coef, stage2.lpr_loss_coef) == ("review", 0.0, 0.1)
    assert data_args.generate_lang_mask


def _with_dataset_info(tmp_path: Path, language_of: dict[str, str | None]) -> str:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    info = {}
    for name, language in language_of.items():
        shutil.copy(REPO_DATA / "new_hu.jsonl", data_dir / f"{name}.jsonl")
        info[name] = {"file_name": f"{name}.jsonl", "columns": {"prompt": "text"}}
        if language is not None:
            info[name]["language"] = language
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    return str(data_dir)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"lpr_loss_coef": 0.1}, "`lpr_loss_coef` applies to the review stage only"),
        ({"moelpr_stage": "review"}, "set `generate_lang_mask: true`"),
        (
            {"moelpr_stage": "review", "generate_lang_mask": True, "dataset": "new_hu,new_tr"},
            'marked `"language": "old"`',
        ),
        ({"finetuning_type": "full", "moelpr_stage": "review"}, "only apply with `finetuning_type: moelpr`"),
        ({"finetuning_type": "full", "generate_lang_mask": True}, "only applies with `finetuning_type: moelpr`"),
        ({"stage": "sft", "template": "empty"}, "runs with `stage: pt`"),
        ({"moe_aux_loss_coef": 0.02}, "set the load-balancing weight with `aux_loss_coef`"),
        ({"train_from_scratch": True}, "`train_from_scratch` re-initialises every weight"),
        ({"resize_vocab": True}, "`resize_vocab` would add embedding rows"),
        ({"add_special_tokens": "<x>"}, "`add_special_tokens` would add embedding rows"),
        ({"label_smoothing_factor": 0.1}, "`label_smoothing_factor` makes the trainer compute its own loss"),
        ({"dataset_dir": "ONLINE"}, "`dataset_dir: ONLINE` has no dataset_info.json"),
        ({"upcast_layernorm": True}, "`upcast_layernorm` casts the frozen norm weights"),
        ({"mixture_of_depths": "convert"}, "`mixture_of_depths` rewrites the decoder layers"),
        ({"quantization_bit": 4}, "`quantization_bit` quantizes the frozen weights"),
        (
            {"push_to_hub": True, "hub_model_id": "me/stage1"},
            "`push_to_hub` would upload slim checkpoints, .* set `moelpr_save_full: true` .* run `moelpr merge`",
        ),
    ],
    ids=[
        "lpr_in_stage1",
        "review_without_mask",
        "review_without_old_data",
        "stage_key_without_moelpr",
        "mask_without_moelpr",
        "not_pt",
        "lf_moe_aux_key",
        "train_from_scratch",
        "resize_vocab",
        "new_special_tokens",
        "label_smoothing",
        "online_datasets",
        "upcast_layernorm",
        "mixture_of_depths",
        "quantization_bit",
        "push_slim_outputs",
    ],
)
def test_bad_settings_raise_a_clear_error(base_args, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_train_args({**base_args, **overrides})


def test_whole_outputs_may_be_pushed(base_args):
    _, _, training_args, _, _ = get_train_args({**base_args, "push_to_hub": True, "moelpr_save_full": True})
    assert training_args.push_to_hub


def test_resume_from_an_incomplete_checkpoint_is_refused(base_args, tmp_path):
    from moelpr.llamafactory_plugin.checkpoint_saves import saving_marker

    for step in (1, 2):
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
    saving_marker(tmp_path / "out" / "checkpoint-2").touch()  # what a run killed inside that save leaves
    resume = str(tmp_path / "out" / "checkpoint-2")
    with pytest.raises(ValueError, match=f"is incomplete: .* Resume from {tmp_path / 'out' / 'checkpoint-1'}"):
        get_train_args({**base_args, "resume_from_checkpoint": resume})


def test_dense_model_points_to_upcycling(base_args, tiny_llama_dir):
    with pytest.raises(ValueError, match="moelpr upcycle --model_path"):
        get_train_args({**base_args, "model_name_or_path": str(tiny_llama_dir)})


def test_pre_quantized_checkpoint_is_refused(base_args, upcycled_llama_dir, tmp_path):
    quantized = tmp_path / "quantized"
    shutil.copytree(upcycled_llama_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is a quantized checkpoint"):
        get_train_args({**base_args, "model_name_or_path": str(quantized)})


def test_unknown_language_value(base_args, tmp_path):
    data_dir = _with_dataset_info(tmp_path, {"hu": "new", "fr": "french"})
    with pytest.raises(ValueError, match=r"Unknown `language`.*'fr': 'french'"):
        get_train_args({**base_args, "dataset": "hu,fr", "dataset_dir": data_dir})


def test_lang_mask_needs_a_language_on_every_dataset(base_args, tmp_path):
    data_dir = _with_dataset_info(tmp_path, {"hu": "new", "plain": None})
    args = {**base_args, "dataset": "hu,plain", "dataset_dir": data_dir, "generate_lang_mask": True}
    with pytest.raises(ValueError, match="missing on: plain"):
        get_train_args(args)
    get_train_args({**args, "generate_lang_mask": False})  # stage 1 without the mask needs no language


def test_release_check_names_the_supported_releases(monkeypatch):
    import importlib.metadata

    plugin.check_releases()  # the installed stack is the checked one
    installed = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.4" if name == "llamafactory" else installed(name))
    with pytest.raises(plugin.UnsupportedReleaseError, match=r"supports llamafactory>=0.9.5,<0.9.6 with "
                       r"transformers>=5.6,<5.7, and llamafactory 0.9.4 is installed"):
        plugin.check_releases()


def test_startup_hook_is_cheap_and_applies_the_plugin_to_llamafactory():
    """The .pth hook installed by `pip install` imports nothing heavy at startup, yet patches on import."""
    probe = (
        "import sys; heavy = [m for m in ('torch', 'transformers', 'moelpr') if m in sys.modules]; "
        "import llamafactory.train.tuner; from llamafactory.hparams import parser; "
        "print(heavy, [c.__name__ for c in parser._TRAIN_ARGS])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.startswith("[] ")
    assert "MoELPRFinetuningArguments" in out and "MoELPRDataArguments" in out


@pytest.mark.parametrize("stage,expected", [(1, ("post_pretrain", 0.01, 0.0)), (2, ("review", 0.0, 0.1))])
def test_example_recipes_parse(stage, expected, upcycled_llama_dir, tmp_path):
    recipe = yaml.safe_load((REPO_DATA.parent / "examples" / "moelpr" / f"stage{stage}.yaml").read_text())
    recipe.update(model_name_or_path=str(upcycled_llama_dir), output_dir=str(tmp_path), bf16=False, use_cpu=True)
    recipe["dataset_dir"] = str(REPO_DATA)
    _, data_args, training_args, finetuning_args, _ = get_train_args(recipe)
    assert (finetuning_args.moelpr_stage, finetuning_args.aux_loss_coef, finetuning_args.lpr_loss_coef) == expected
    assert data_args.generate_lang_mask == (stage == 2)
    assert training_args.learning_rate == 5e-5 and data_args.cutoff_len == {1: 1024, 2: 512}[stage]


def test_apply_before_the_startup_hook_fires_patches_once():
    """apply() imports LLaMA-Factory's trainer, which fires the hook's apply(): nothing is wrapped twice."""
    probe = (
        "from llamafactory.hparams import parser; import moelpr.llamafactory_plugin as plugin; plugin.apply(); "
        "print(parser._parse_train_args.__closure__[0].cell_contents.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "llamafactory.hparams.parser"


def test_trainer_refuses_to_backpropagate_another_loss(base_args, upcycled_llama_dir):
    """A custom compute_loss_func would bypass the model's loss, through which the router losses get their gradient."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelpr.llamafactory_plugin.trainer import MoELPRTrainer

    _, _, training_args, finetuning_args, _ = get_train_args(base_args)
    common = {
        "model": AutoModelForCausalLM.from_pretrained(upcycled_llama_dir),
        "args": training_args,
        "finetuning_args": finetuning_args,
        "processor": None,
        "tokenizer": AutoTokenizer.from_pretrained(upcycled_llama_dir),
    }
    MoELPRTrainer(**common)  # the model's own loss is fine
    with pytest.raises(ValueError, match="must be trained on the loss it returns"):
        MoELPRTrainer(**common, compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)


def test_moect_checkpoint_resolves_its_settings(base_args, moect_llama_dir):
    args = {**base_args, "model_name_or_path": str(moect_llama_dir)}
    *_, finetuning_args, _ = get_train_args(args)
    resolved = ("moelpr_method", "moelpr_stage", "aux_loss_coef", "lpr_loss_coef", "moect_train_embeddings")
    assert tuple(getattr(finetuning_args, key) for key in resolved) == ("moe_ct", "post_pretrain", 0.01, 0.0, True)
    *_, finetuning_args, _ = get_train_args({**args, "moelpr_method": "moe_ct", "moect_train_embeddings": False})
    assert finetuning_args.moect_train_embeddings is False
    *_, finetuning_args, _ = get_train_args(base_args)
    assert (finetuning_args.moelpr_method, finetuning_args.moect_train_embeddings) == ("moe_lpr", None)


@pytest.mark.parametrize(
    "checkpoint,overrides,message",
    [
        ("lpr", {"moelpr_method": "moe_ct"}, "`moelpr_method: moe_ct` needs a checkpoint upcycled with `moelpr upcycle "
                                             "--method moe_ct`, but .* is a MoE-LPR checkpoint"),
        ("lpr", {"moect_train_embeddings": True}, "`moect_train_embeddings` applies to MoE-CT checkpoints"),
        ("ct", {"moelpr_method": "moe_lpr"}, "is a MoE-CT checkpoint \\(its config.json says `moe_method: ct`\\)"),
        ("ct", {"moelpr_stage": "review", "generate_lang_mask": True}, "MoE-CT checkpoint, which has one training stage"),
        ("ct", {"lpr_loss_coef": 0.1}, "`lpr_loss_coef` is MoE-LPR's loss"),
        ("ct", {"finetuning_type": "full", "moect_train_embeddings": False}, "only apply with `finetuning_type: moelpr`"),
    ],
    ids=["ct_method_on_lpr", "ct_embeddings_key_on_lpr", "lpr_method_on_ct", "review_on_ct", "lpr_loss_on_ct",
         "ct_key_without_moelpr"],
)
def test_method_settings_must_match_the_checkpoint(base_args, moect_llama_dir, checkpoint, overrides, message):
    args = {**base_args, **overrides}
    if checkpoint == "ct":
        args["model_name_or_path"] = str(moect_llama_dir)
    with pytest.raises(MoELPRArgumentError, match=message):
        get_train_args(args)


def test_moect_recipe_parses_with_the_authors_settings(moect_llama_dir, tmp_path):
    recipe = yaml.safe_load((REPO_DATA.parent / "examples" / "moelpr" / "moect.yaml").read_text())
    recipe.update(model_name_or_path=str(moect_llama_dir), output_dir=str(tmp_path), bf16=False, use_cpu=True)
    recipe["dataset_dir"] = str(REPO_DATA)
    _, data_args, training_args, finetuning_args, _ = get_train_args(recipe)
    assert (finetuning_args.moelpr_method, finetuning_args.moect_train_embeddings) == ("moe_ct", True)
    assert (training_args.learning_rate, training_args.adam_beta1, training_args.adam_beta2) == (5e-5, 0.9, 0.95)
    assert training_args.weight_decay == 0.0 and str(training_args.lr_scheduler_type) == "SchedulerType.COSINE"
    assert data_args.mix_strategy == "interleave_under" and data_args.generate_lang_mask


@pytest.mark.parametrize("train_embeddings", [True, False])
def test_moect_freeze_rules_with_tied_embeddings(tmp_path, train_embeddings):
    """Tied input and output embeddings are one tensor: it trains once (or not at all) with the MoE-CT modules."""
    from tiny_models import save_dense_model
    from transformers import AutoModelForCausalLM

    from moelpr.llamafactory_plugin.model import setup_moelpr_tuning
    from moelpr.upcycling.settings import UpcycleSettings
    from moelpr.upcycling.upcycle import upcycle

    dense = save_dense_model(tmp_path / "dense", "qwen2", num_layers=2, tie_word_embeddings=True)
    upcycled = upcycle(dense, tmp_path / "ct", UpcycleSettings(moe_layers=[1], method="moe_ct"))
    model = AutoModelForCausalLM.from_pretrained(upcycled)
    setup_moelpr_tuning(model, "post_pretrain", upcast_trainable=False, train_embeddings=train_embeddings)
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    moe = {name for name, _ in model.named_parameters() if name.startswith("model.layers.1.mlp.")}
    moe = {name for name in moe if ".original_expert." not in name}
    assert {name.split(".mlp.")[1].split(".")[0] for name in moe} == {"router", "new_experts", "fusion"}
    assert trained == moe | ({"model.embed_tokens.weight"} if train_embeddings else set())
    assert model.lm_head.weight.requires_grad == train_embeddings  # the same tensor as the input embeddings
