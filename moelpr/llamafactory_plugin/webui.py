"""``moelpr`` in LlamaBoard (``llamafactory-cli webui``): the method in the "Finetuning method" dropdown, a panel
with its keys in the Train tab, dataset languages in the dataset picker, and the plugin's argument errors shown
in the UI before anything starts.

LlamaBoard builds the training YAML from its components and runs ``llamafactory-cli train`` on it, so the
training plugin does the rest (freeze rules, routing statistics in the logs and loss plots).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
from llamafactory.extras import logging

from .hparams import DEFAULT_AUX_LOSS_COEF, DEFAULT_LPR_LOSS_COEF, MoELPRArgumentError
from .setting_values import MOELPR, POST_PRETRAIN, REVIEW

logger = logging.get_logger(__name__)

METHOD_CHOICES = ("moe_lpr", "moe_ct")
PRETRAINING = "Pre-Training"  # LlamaBoard's name of `stage: pt`, the only stage moelpr runs with
# The recipes' settings (examples/moelpr/stage1.yaml, stage2.yaml) for the Train tab's fields, by moelpr stage;
# tests/test_webui.py checks them against the recipe files.
RECIPE_FIELDS = {
    POST_PRETRAIN: {"cutoff_len": 1024, "batch_size": 16, "gradient_accumulation_steps": 4, "max_samples": "100000"},
    REVIEW: {"cutoff_len": 512, "batch_size": 4, "gradient_accumulation_steps": 8, "max_samples": "50000"},
}
RECIPE_COMMON = {"learning_rate": "5e-5", "num_train_epochs": "1.0", "lr_scheduler_type": "cosine"}
# The language mask: off in the stage-1 recipe, required by the review stage.
RECIPE_LANG_MASK = {POST_PRETRAIN: False, REVIEW: True}
# Keys LlamaBoard would drop from the YAML when false although false is not their default.
KEEP_WHEN_FALSE = ("moect_train_embeddings",)

LOCALES = {
    "moelpr_tab": {
        "en": {"label": "MoE-LPR configurations"},
        "ru": {"label": "Конфигурации MoE-LPR"},
        "zh": {"label": "MoE-LPR 参数设置"},
        "ko": {"label": "MoE-LPR 구성"},
        "ja": {"label": "MoE-LPR 設定"},
    },
    "moelpr_stage": {
        "en": {
            "label": "MoE-LPR stage",
            "info": "post_pretrain (stage 1): new experts + routers on new-language text; "
            "review (stage 2): routers only, LPR loss on an old/new replay mix.",
        },
        "ru": {
            "label": "Этап MoE-LPR",
            "info": "post_pretrain (этап 1): новые эксперты и маршрутизаторы на тексте нового языка; "
            "review (этап 2): только маршрутизаторы, потеря LPR на смеси старого и нового языков.",
        },
        "zh": {
            "label": "MoE-LPR 阶段",
            "info": "post_pretrain（阶段 1）：在新语言文本上训练新专家和路由器；review（阶段 2）：只训练路由器，在新旧语言混合数据上使用 LPR 损失。",
        },
        "ko": {
            "label": "MoE-LPR 단계",
            "info": "post_pretrain(1단계): 새 언어 텍스트로 새 전문가와 라우터를 학습; "
            "review(2단계): 라우터만 학습, 기존/새 언어 혼합 데이터에 LPR 손실.",
        },
        "ja": {
            "label": "MoE-LPR ステージ",
            "info": "post_pretrain（ステージ 1）：新言語のテキストで新しいエキスパートとルーターを学習；"
            "review（ステージ 2）：ルーターのみ、旧・新言語の混合データで LPR 損失。",
        },
    },
    "moelpr_method": {
        "en": {"label": "Method", "info": "moe_lpr, or moe_ct for a checkpoint upcycled with --method moe_ct."},
        "ru": {"label": "Метод", "info": "moe_lpr или moe_ct для чекпоинта, созданного с --method moe_ct."},
        "zh": {"label": "方法", "info": "moe_lpr；用 --method moe_ct 扩展的检查点选 moe_ct。"},
        "ko": {"label": "방법", "info": "moe_lpr, 또는 --method moe_ct로 만든 체크포인트에는 moe_ct."},
        "ja": {"label": "手法", "info": "moe_lpr、または --method moe_ct で作成したチェックポイントには moe_ct。"},
    },
    "aux_loss_coef": {
        "en": {"label": "Balance loss coefficient", "info": "Weight of the load-balancing loss."},
        "ru": {"label": "Коэффициент балансировки", "info": "Вес потери балансировки нагрузки экспертов."},
        "zh": {"label": "负载均衡损失系数", "info": "专家负载均衡损失的权重。"},
        "ko": {"label": "균형 손실 계수", "info": "부하 균형 손실의 가중치."},
        "ja": {"label": "バランス損失係数", "info": "負荷分散損失の重み。"},
    },
    "lpr_loss_coef": {
        "en": {"label": "LPR loss coefficient", "info": "Weight of the LPR loss (review stage only)."},
        "ru": {"label": "Коэффициент LPR", "info": "Вес потери LPR (только этап review)."},
        "zh": {"label": "LPR 损失系数", "info": "LPR 损失的权重（仅 review 阶段）。"},
        "ko": {"label": "LPR 손실 계수", "info": "LPR 손실의 가중치 (review 단계 전용)."},
        "ja": {"label": "LPR 損失係数", "info": "LPR 損失の重み（review ステージのみ）。"},
    },
    "generate_lang_mask": {
        "en": {"label": "Language mask", "info": "Tag tokens with their dataset's language (needed by review)."},
        "ru": {"label": "Маска языка", "info": "Помечать токены языком их датасета (нужно для review)."},
        "zh": {"label": "语言掩码", "info": "按数据集的语言标记每个 token（review 阶段必需）。"},
        "ko": {"label": "언어 마스크", "info": "토큰에 데이터셋의 언어를 표시 (review에 필요)."},
        "ja": {"label": "言語マスク", "info": "トークンにデータセットの言語を付ける（review に必要）。"},
    },
    "moect_train_embeddings": {
        "en": {"label": "MoE-CT: train embeddings", "info": "Also train the embeddings and LM head (MoE-CT)."},
        "ru": {"label": "MoE-CT: обучать эмбеддинги", "info": "Также обучать эмбеддинги и LM head (MoE-CT)."},
        "zh": {"label": "MoE-CT：训练词嵌入", "info": "同时训练词嵌入和 LM head（仅 MoE-CT）。"},
        "ko": {"label": "MoE-CT: 임베딩 학습", "info": "임베딩과 LM head도 학습 (MoE-CT)."},
        "ja": {"label": "MoE-CT：埋め込みを学習", "info": "埋め込みと LM head も学習（MoE-CT）。"},
    },
}


def _create_panel() -> dict[str, gr.components.Component]:
    """The moelpr accordion, in LlamaBoard's style (labels come from LOCALES when the page sets its language)."""
    with gr.Accordion(open=False, render=False, elem_id="moelpr_tab") as moelpr_tab:
        with gr.Row():
            moelpr_stage = gr.Dropdown(choices=[POST_PRETRAIN, REVIEW], value=POST_PRETRAIN)
            moelpr_method = gr.Dropdown(choices=list(METHOD_CHOICES), value=METHOD_CHOICES[0])
            aux_loss_coef = gr.Slider(minimum=0, maximum=1, value=DEFAULT_AUX_LOSS_COEF[POST_PRETRAIN], step=0.001)
            lpr_loss_coef = gr.Slider(minimum=0, maximum=1, value=DEFAULT_LPR_LOSS_COEF[POST_PRETRAIN], step=0.01)
            with gr.Column():
                generate_lang_mask = gr.Checkbox(value=RECIPE_LANG_MASK[POST_PRETRAIN])
                moect_train_embeddings = gr.Checkbox(value=True, interactive=False)
    return dict(
        moelpr_tab=moelpr_tab,
        moelpr_stage=moelpr_stage,
        moelpr_method=moelpr_method,
        aux_loss_coef=aux_loss_coef,
        lpr_loss_coef=lpr_loss_coef,
        generate_lang_mask=generate_lang_mask,
        moect_train_embeddings=moect_train_embeddings,
    )


def _place_after(block: gr.blocks.Block, anchor: gr.blocks.Block) -> None:
    """Move a rendered block right after ``anchor`` among its parent's children (layout is built at launch)."""
    siblings = anchor.parent.children
    siblings.remove(block)
    siblings.insert(siblings.index(anchor) + 1, block)
    block.parent = anchor.parent


def wrap_create_train_tab(create_train_tab: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    def create_train_tab_with_moelpr(engine: Any) -> dict[str, Any]:
        panel = _create_panel()
        fields = [elem for name, elem in panel.items() if name != "moelpr_tab"]
        # LlamaBoard's buttons send the components the tab starts from (manager.get_base_elems()) plus its own;
        # adding the panel's fields there while the tab is built makes Preview/Start/Save send them too.
        base_elems = engine.manager.get_base_elems
        engine.manager.get_base_elems = lambda: base_elems() | set(fields)
        try:
            elems = create_train_tab(engine)
        finally:
            del engine.manager.get_base_elems
        panel["moelpr_tab"].render()
        _place_after(panel["moelpr_tab"], elems["lora_tab"])
        _connect(engine, elems, panel)
        return {**elems, **panel}

    return create_train_tab_with_moelpr


def _connect(engine: Any, elems: dict[str, Any], panel: dict[str, Any]) -> None:
    """Recipe defaults when the user picks moelpr or a stage (``.input``: not when LlamaBoard loads a config)."""
    finetuning_type = engine.manager.get_elem_by_id("top.finetuning_type")
    stage_fields = [elems[name] for name in RECIPE_FIELDS[POST_PRETRAIN]]
    common_fields = [elems[name] for name in RECIPE_COMMON]
    loss_fields = [panel["aux_loss_coef"], panel["lpr_loss_coef"], panel["generate_lang_mask"]]

    def stage_defaults(stage: str) -> list[Any]:
        values = list(RECIPE_FIELDS[stage].values())
        return values + [DEFAULT_AUX_LOSS_COEF[stage], DEFAULT_LPR_LOSS_COEF[stage], RECIPE_LANG_MASK[stage]]

    def pick_method(finetuning_type: str) -> dict[Any, Any]:
        if finetuning_type != MOELPR:
            return {panel["moelpr_tab"]: gr.Accordion(open=False)}
        defaults = dict(zip(stage_fields + loss_fields, stage_defaults(POST_PRETRAIN)))
        defaults |= dict(zip(common_fields, RECIPE_COMMON.values()))
        defaults |= {elems["training_stage"]: PRETRAINING, panel["moelpr_stage"]: POST_PRETRAIN}
        return {panel["moelpr_tab"]: gr.Accordion(open=True), **defaults}

    outputs = [panel["moelpr_tab"], panel["moelpr_stage"], elems["training_stage"], *stage_fields, *common_fields]
    finetuning_type.input(pick_method, [finetuning_type], outputs + loss_fields, queue=False)
    panel["moelpr_stage"].input(stage_defaults, [panel["moelpr_stage"]], stage_fields + loss_fields, queue=False)
    panel["moelpr_method"].input(
        lambda method: gr.Checkbox(interactive=method == "moe_ct"),
        [panel["moelpr_method"]],
        [panel["moect_train_embeddings"]],
        queue=False,
    )


def wrap_runner_parse_train_args(parse: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def _parse_train_args(self: Any, data: dict[Any, Any]) -> dict[str, Any]:
        args = parse(self, data)
        if args["finetuning_type"] != MOELPR:
            return args
        get = lambda name: data[self.manager.get_elem_by_id(f"train.{name}")]  # noqa: E731
        args.update(
            moelpr_stage=get("moelpr_stage"),
            moelpr_method=get("moelpr_method"),
            aux_loss_coef=get("aux_loss_coef"),
            lpr_loss_coef=get("lpr_loss_coef"),
            generate_lang_mask=get("generate_lang_mask"),
        )
        if get("moelpr_method") == "moe_ct":
            args["moect_train_embeddings"] = get("moect_train_embeddings")
        return args

    return _parse_train_args


def wrap_runner_initialize(initialize: Callable[..., str]) -> Callable[..., str]:
    """Run the plugin's argument checks when the user previews or starts a moelpr run: a mistake shows as the
    plugin's one-line message in the UI (LlamaBoard's warning and output box) and nothing starts."""

    def _initialize(self: Any, data: dict[Any, Any], do_train: bool, from_preview: bool) -> str:
        error = initialize(self, data, do_train, from_preview)
        finetuning_type = data[self.manager.get_elem_by_id("top.finetuning_type")]
        if error or not do_train or finetuning_type != MOELPR:
            return error
        from llamafactory.hparams import parser  # its _parse_train_args carries the plugin's checks

        try:
            parser._parse_train_args(self._parse_train_args(data))
        except MoELPRArgumentError as err:
            return f"[moelpr] error: {err}"
        except Exception as err:  # not a moelpr setting: the run reports it as it does for every method
            logger.info_rank0(f"moelpr checks skipped in the web UI: {err}")
        return ""

    return _initialize


def wrap_clean_cmd(clean_cmd: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def _clean_cmd(args: dict[str, Any]) -> dict[str, Any]:
        return {**clean_cmd(args), **{key: args[key] for key in KEEP_WHEN_FALSE if args.get(key) is False}}

    return _clean_cmd


def wrap_list_datasets(list_datasets: Callable[..., gr.Dropdown]) -> Callable[..., gr.Dropdown]:
    """The Train tab's dataset picker shows each dataset's ``language`` from dataset_info.json beside its name."""

    def list_datasets_with_language(dataset_dir: str | None = None, *args: Any) -> gr.Dropdown:
        from llamafactory.webui.common import DEFAULT_DATA_DIR, load_dataset_info

        dropdown = list_datasets(dataset_dir, *args)
        info = load_dataset_info(dataset_dir if dataset_dir is not None else DEFAULT_DATA_DIR)
        choices = []
        for name, _ in dropdown.choices:
            language = info.get(name, {}).get("language")
            choices.append((f"{name} ({language})" if language else name, name))
        return gr.Dropdown(choices=choices)

    return list_datasets_with_language


def add_method(methods: list[str]) -> list[str]:
    return [*methods, MOELPR]


def add_locales(locales: dict[str, Any]) -> dict[str, Any]:
    # LlamaBoard's other modules hold this same dict object, so it is filled in place.
    locales.update(LOCALES)
    return locales
