"""What a training stage costs, from a model's ``config.json`` alone: parameters, GPU memory, disk and FLOPs.

Nothing is loaded or allocated: the upcycled model is built on the meta device from the config (a dense model's,
upcycled with the given experts, or an upcycled one's), so every family's shapes are exact. The rest is arithmetic:

- Model states follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
  ``estimate_zero3_model_states_mem_needs`` in deepspeed 0.16.4), applied to what the stage trains: bytes per
  trained parameter 2 (16-bit gradient, ZeRO-2 only) + 4 (fp32 gradient) + 4 (fp32 master weight) + 8 (Adam's two
  moments), partitioned over the GPUs; every parameter's 16-bit weight, replicated under ZeRO-2 and partitioned
  under ZeRO-3, where the largest unit gathered at once (an MoE block is one ZeRO-3 leaf module here) adds its
  16-bit weight and gradient. Without DeepSpeed (ZeRO "0": one GPU or DDP), LLaMA-Factory keeps the trained tensors in
  fp32 beside the 16-bit frozen ones and the trainer's AdamW holds two fp32 moments.
- Activations come from per-token factors measured on the CPU (``benchmarks/activation_memory.py``; the figures
  and the estimate's error against measured peaks are in benchmarks/README.md).
- FLOPs count the matrix products (2 per multiply-add) and causal attention: forward, the input gradients of the
  backward, the weight gradients of the trained matrices only, and with gradient checkpointing the recomputed
  forward of the decoder layers. Routing is taken as even (each expert gets k / N of the tokens).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from .errors import MoELPRUserError
from .models import MOE_FAMILIES
from .models.configuration import CT, DEFAULT_EXPERTS, LPR, METHOD_NAMES
from .models.moe import NEW_EXPERTS_NAME, ROUTER_NAME
from .models.moe_ct import FUSION_NAME

# The YAML's ``moelpr_stage`` values (MoE-CT has one stage, the first).
POST_PRETRAIN, REVIEW = "post_pretrain", "review"
STAGES = (POST_PRETRAIN, REVIEW)
ZERO_STAGES = (0, 2, 3)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GIB = 2**30

# Activation memory per token, measured on the CPU (benchmarks/activation_memory.py; the measurements, the fits and
# the estimate's error against measured peaks are in benchmarks/README.md). A decoder layer holds
# ``attention * hidden_size + ffn * intermediate_size * FFNs run per token`` elements per token for its backward;
# the factors depend on what the layer trains ("full": dense full fine-tuning; "experts": MoE-LPR stage 1 and MoE-CT,
# new experts and routers; "routers": stage 2, and the dense layers of a partly upcycled model) and on the bytes of
# the training dtype (a bf16 layer also keeps fp32 copies, e.g. in its RMS norms). Keyed by element bytes.
LAYER_FACTORS: dict[int, dict[str, tuple[float, float]]] = {
    2: {"full": (11.07, 4.01), "experts": (12.30, 3.84), "routers": (11.07, 3.02)},
    4: {"full": (8.66, 4.00), "experts": (10.64, 3.76), "routers": (9.08, 2.96)},
}
# With gradient checkpointing each layer keeps its input (CHECKPOINTED_FACTOR hidden_size-wide elements per token)
# until its backward, and the peak comes either in the loss's backward (the head's memory) or while the backward
# recomputes a layer: up to RECOMPUTED_LAYER_FACTOR times the layer's kept tensors, their gradients included. By
# then each MoE layer recomputed before holds one more hidden_size-wide tensor per token, kept until the step ends
# by its routing record (the recomputed router logits and their graph): tiny models, whose head is small, peak there.
CHECKPOINTED_FACTOR = 1.0
RECOMPUTED_LAYER_FACTOR = 1.3
RETAINED_AFTER_RECOMPUTE = 1.0
# The LM head and the loss, bytes per token and vocabulary entry, in either dtype: the logits, their fp32 copy for
# the loss and its gradient; and the rest of the model (the embeddings' output, the final norm), hidden_size-wide
# elements per token.
HEAD_BYTES_PER_VOCAB = 12.0
REST_FACTOR = 6.0


class EstimateError(MoELPRUserError, ValueError):
    """A config or setting the estimate cannot work with."""


@dataclass(frozen=True)
class Setup:
    """The settings that decide a stage's cost.

    ``zero_stage`` 0 means no DeepSpeed (one GPU, or DDP over ``gpus``); ``offload_params`` needs ZeRO-3.
    ``train_embeddings``: MoE-CT's ``moect_train_embeddings``.
    """

    stage: str = POST_PRETRAIN
    gpus: int = 8
    nodes: int = 1
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch: int = 1
    cutoff_len: int = 1024
    gradient_checkpointing: bool = True
    dtype: str = "bf16"
    train_embeddings: bool = True

    def check(self, method: str) -> None:
        if self.stage not in STAGES:
            raise EstimateError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}.")
        if method == CT and self.stage == REVIEW:
            raise EstimateError("MoE-CT has one stage (post_pretrain); the review stage is MoE-LPR's.")
        if self.zero_stage not in ZERO_STAGES:
            raise EstimateError(f"--zero must be one of {', '.join(map(str, ZERO_STAGES))}, got {self.zero_stage}.")
        if self.dtype not in DTYPE_BYTES:
            raise EstimateError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}.")
        if self.offload_optimizer and self.zero_stage == 0:
            raise EstimateError("--offload_optimizer needs DeepSpeed ZeRO (--zero 2 or 3).")
        if self.offload_params and self.zero_stage != 3:
            raise EstimateError("--offload_params needs ZeRO-3 (--zero 3).")
        for name in ("gpus", "nodes", "micro_batch", "cutoff_len"):
            if getattr(self, name) < 1:
                raise EstimateError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.gpus % self.nodes:
            raise EstimateError(f"--gpus ({self.gpus}) must be a multiple of --nodes ({self.nodes}).")


@dataclass(frozen=True)
class Shape:
    """What the estimate reads from the upcycled model: parameter counts by role and the per-token work."""

    total: int  # parameters of the upcycled model (tied embeddings once)
    trained: int
    active: int  # parameters a token's forward pass uses (the experts it is routed to, not the others)
    dense_total: int  # the dense model before upcycling
    matmul_active: int  # matrix weights a token multiplies with in the forward (LM head included, lookup not)
    matmul_trained: int  # of these, trained ones (each gets a weight gradient for the token)
    dense_matmul: int  # the dense model's matmul_active
    head_matmul: int  # the LM head's weights
    largest_gathered: int  # ZeRO-3: the most parameters gathered at once (an MoE block or another module)
    largest_gathered_trained: int
    attention_width: int  # query heads x head size: causal attention costs 2 * cutoff * this FLOPs per token per layer
    layers: list[tuple[str, float, float]]  # per decoder layer: what it trains (a key of LAYER_FACTORS), the share
    # of its attention part and the FFNs per token that keep tensors for the backward
    moe_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int


@dataclass(frozen=True)
class Estimate:
    description: str
    shape: Shape
    setup: Setup
    memory: dict[str, int]  # bytes per GPU
    cpu_memory_per_node: int  # bytes, DeepSpeed's estimate with offloading; 0 without
    disk: dict[str, int]  # bytes
    flops_per_token: dict[str, float]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def read_config(path: str | Path) -> PretrainedConfig:
    """The (dense or upcycled) config at ``path``: a ``config.json`` file or a model directory holding one."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise EstimateError(f"{path} is neither a config.json file nor a directory holding one.")
    try:
        fields = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise EstimateError(f"{config_file} is not valid JSON: {error}") from None
    model_type = fields.pop("model_type", None)
    moe_types = {config_class.model_type: config_class for config_class, _ in MOE_FAMILIES.values()}
    if model_type in moe_types:
        return moe_types[model_type](**fields)
    if model_type not in MOE_FAMILIES:
        raise EstimateError(
            f"{config_file}: model_type {model_type!r} is not a family moelpr upcycles "
            f"({', '.join(sorted(MOE_FAMILIES))})."
        )
    return AutoConfig.for_model(model_type, **fields)


def upcycled_config(
    config: PretrainedConfig,
    method: str | None = None,
    num_experts: int | list[int] | None = None,
    top_k: int | None = None,
    moe_layers: list[int] | None = None,
) -> PretrainedConfig:
    """The MoE config a dense ``config`` upcycles to (``moelpr upcycle``'s defaults for what is not given); an
    upcycled config is returned as it is, and giving it other expert settings is an error."""
    is_upcycled = config.model_type not in MOE_FAMILIES
    if is_upcycled:
        asked = {"method": method, "num_experts": num_experts, "topk": top_k, "moe_layers": moe_layers}
        given = [f"--{name}" for name, value in asked.items() if value is not None]
        if given:
            raise EstimateError(
                f"the config is an upcycled model's ({config.model_type}), which fixes the experts; "
                f"leave out {', '.join(given)}."
            )
        return config
    moe_method = METHOD_NAMES[method or "moe_lpr"]
    default_experts, default_top_k = DEFAULT_EXPERTS[moe_method]
    config_class = MOE_FAMILIES[config.model_type][0]
    try:
        return config_class.from_dense(
            config,
            moe_method=moe_method,
            num_experts=default_experts if num_experts is None else num_experts,
            num_experts_per_tok=default_top_k if top_k is None else top_k,
            moe_layers=moe_layers,
        )
    except ValueError as error:
        raise EstimateError(str(error)) from None


def measure_shape(config: PretrainedConfig, setup: Setup) -> Shape:
    """Parameter counts and per-token work of the upcycled model of ``config`` (an MoE config) in ``setup``'s stage."""
    model_class = next(model for config_class, model in MOE_FAMILIES.values() if isinstance(config, config_class))
    with torch.device("meta"):
        model = model_class(config)
    method = config.moe_method
    head = model.get_output_embeddings().weight
    embeddings = {id(model.get_input_embeddings().weight), id(head)}
    trains_embeddings = method == CT and setup.train_embeddings
    params = {id(p): p for p in model.parameters()}  # tied embeddings once
    trained = {
        id(p)
        for name, p in model.named_parameters()
        if _trains(name, method, setup.stage) or (trains_embeddings and id(p) in embeddings)
    }
    blocks = {id(block): block for block in model.moe_blocks()}
    in_blocks = {id(p) for block in blocks.values() for p in block.parameters()}
    routing = {  # routers and MoE-CT's fusion layers
        id(p)
        for block in blocks.values()
        for n, p in block.named_parameters()
        if n.startswith((ROUTER_NAME, FUSION_NAME))
    }
    outside_matrices = sum(p.numel() for i, p in params.items() if p.dim() == 2 and i not in in_blocks | embeddings)

    total = sum(p.numel() for p in params.values())
    active = total
    new_experts = 0
    matmul_active = dense_matmul = head.numel() + outside_matrices
    matmul_trained = head.numel() if trains_embeddings else 0
    # Per decoder layer, for its activations: what it trains, the share of its attention part that keeps tensors for
    # the backward, and the FFNs per token whose tensors it keeps. Below the first trained parameter nothing needs
    # a gradient, so nothing is kept: the first MoE layer keeps only its trained experts' tensors.
    layers = []
    below = not trains_embeddings
    for layer in model.model.layers:
        block = blocks.get(id(layer.mlp))
        if block is None:  # a dense layer, frozen in every MoE stage
            layers.append(("routers", 0.0, 0.0) if below else ("routers", 1.0, 1.0))
            continue
        expert = sum(p.numel() for p in block.original_expert.parameters())
        expert_matrices = sum(p.numel() for p in block.original_expert.parameters() if p.dim() == 2)
        router = sum(p.numel() for p in block.parameters() if id(p) in routing)
        routed, k = len(block.routed_experts()), block.config.num_experts_per_tok
        new_experts += len(block.new_experts) * expert
        active -= (routed - k) * expert
        dense_matmul += expert_matrices
        if method == CT:  # the frozen FFN runs beside the k routed experts, all of which train
            matmul_active += (k + 1) * expert_matrices + router
            matmul_trained += k * expert_matrices + router
            layers.append(("experts", 0.0, k) if below else ("experts", 1.0, k + 1))
        elif setup.stage == POST_PRETRAIN:  # of a token's k experts, k (N - 1) / N are new ones on average
            matmul_active += k * expert_matrices + router
            matmul_trained += k * (routed - 1) / routed * expert_matrices + router
            layers.append(("experts", 0.0, k * (routed - 1) / routed) if below else ("experts", 1.0, k))
        else:
            matmul_active += k * expert_matrices + router
            matmul_trained += router
            layers.append(("routers", 0.0, 0.0) if below else ("routers", 1.0, k))
        below = False

    # ZeRO-3 gathers a module's own parameters at a time, an MoE block (a leaf module) all of its parameters.
    in_block_modules = {id(m) for block in blocks.values() for m in block.modules()}
    units = [list(block.parameters()) for block in blocks.values()]
    units += [list(m.parameters(recurse=False)) for m in model.modules() if id(m) not in in_block_modules]
    largest = max(units, key=lambda unit: sum(p.numel() for p in unit))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(
        total=total,
        trained=sum(params[i].numel() for i in trained),
        active=active,
        dense_total=total - new_experts - sum(params[i].numel() for i in routing),
        matmul_active=matmul_active,
        matmul_trained=round(matmul_trained),
        dense_matmul=dense_matmul,
        head_matmul=head.numel(),
        largest_gathered=sum(p.numel() for p in largest),
        largest_gathered_trained=sum(p.numel() for p in largest if id(p) in trained),
        attention_width=config.num_attention_heads * head_dim,
        layers=layers,
        moe_layers=len(blocks),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
    )


def _trains(name: str, method: str, stage: str) -> bool:
    """Whether the parameter ``name`` trains in (method, stage): MoE-LPR's stage 1 the routers and the new experts,
    its stage 2 the routers, MoE-CT the routers, its routed experts and the fusion layers (the plugin's freeze
    rules, ``TRAINABLE_MODULES``; tests/test_estimate.py checks that the two agree)."""
    parts = (ROUTER_NAME,) if method == LPR and stage == REVIEW else (ROUTER_NAME, NEW_EXPERTS_NAME, FUSION_NAME)
    return any(f".mlp.{part}." in name for part in parts)


def model_state_bytes(shape: Shape, setup: Setup) -> tuple[dict[str, int], int]:
    """Bytes per GPU of weights, gradients and optimizer states, and DeepSpeed's CPU memory per node when offloading.

    DeepSpeed's estimators count, for a model that trains every parameter, ZeRO-2: ``2 P + 18 P / gpus`` on each
    GPU (18 = 16-bit and fp32 gradient, fp32 master weight, two fp32 Adam moments: 2 + 4 + 4 + 8); ZeRO-3:
    ``4 L + 18 P / gpus`` (L the largest layer, gathered with its gradient); with the optimizer offloaded, ZeRO-2
    ``2 P`` and ZeRO-3 ``4 L + 2 P / gpus``, with the parameters too ``4 L``. Here P splits into the trained
    parameters, which carry the 16, and the frozen ones, which carry only their weight.
    """
    weight = DTYPE_BYTES[setup.dtype]
    mixed = weight == 2  # a 16-bit run keeps fp32 master weights and gradients; an fp32 run has none apart
    gpus, total, trained = setup.gpus, shape.total, shape.trained
    fp32_grad, master, moments = (4 if mixed else 0), (4 if mixed else 0), 8
    cpu = 0
    if setup.zero_stage == 0:
        # LLaMA-Factory upcasts the trained tensors to fp32 (unless pure_bf16); DDP keeps its own gradient buckets.
        memory = {
            "weights": weight * (total - trained) + 4 * trained,
            "gradients": 4 * trained * (2 if gpus > 1 else 1),
            "optimizer states": moments * trained,
        }
    elif setup.zero_stage == 2:
        memory = {"weights": weight * total, "gradients": 0, "optimizer states": 0}
        if setup.offload_optimizer:
            cpu = int(trained * max(4 * gpus, 16) * 1.5)
        else:
            memory["gradients"] = (weight + fp32_grad) * trained // gpus
            memory["optimizer states"] = (master + moments) * trained // gpus
    else:
        gathered = shape.largest_gathered * weight
        memory = {
            "weights": gathered + (0 if setup.offload_params else weight * total // gpus),
            "gradients": shape.largest_gathered_trained * weight,
            "optimizer states": 0,
        }
        # ZeRO-3 keeps no partitioned 16-bit gradient: the fp32 one (a 16-bit run's, or an fp32 run's own).
        if setup.offload_optimizer:
            params_on_cpu = weight * total if setup.offload_params else 0
            cpu = int(((4 + master + moments) * trained + params_on_cpu) // setup.nodes * 1.5)
        else:
            memory["gradients"] += 4 * trained // gpus
            memory["optimizer states"] = (master + moments) * trained // gpus
    return memory, cpu


def activation_bytes_per_token(shape: Shape, setup: Setup) -> float:
    """Activation memory per token of the micro-batch, from the measured factors (``LAYER_FACTORS`` and the rest)."""
    weight = DTYPE_BYTES[setup.dtype]
    factors = LAYER_FACTORS[weight]
    per_layer = [
        weight
        * (factors[trains][0] * shape.hidden_size * attention + factors[trains][1] * shape.intermediate_size * ffns)
        for trains, attention, ffns in shape.layers
    ]
    head = HEAD_BYTES_PER_VOCAB * shape.vocab_size
    rest = weight * REST_FACTOR * shape.hidden_size
    if not setup.gradient_checkpointing:
        return sum(per_layer) + head + rest
    kept = len(shape.layers) * weight * CHECKPOINTED_FACTOR * shape.hidden_size
    retained = shape.moe_layers * weight * RETAINED_AFTER_RECOMPUTE * shape.hidden_size
    return kept + max(head, retained + RECOMPUTED_LAYER_FACTOR * max(per_layer)) + rest


def flops_per_token(shape: Shape, setup: Setup) -> dict[str, float]:
    """Training FLOPs per token of the stage and of dense full training of the same model and settings."""
    attention = 2 * setup.cutoff_len * shape.attention_width * len(shape.layers)  # causal: half of the square

    def training(matmul: int, matmul_trained: int) -> float:
        forward = 2 * matmul + attention
        backward = 2 * matmul + 2 * matmul_trained + 2 * attention
        recompute = forward - 2 * shape.head_matmul if setup.gradient_checkpointing else 0
        return float(forward + backward + recompute)

    stage = training(shape.matmul_active, shape.matmul_trained)
    dense = training(shape.dense_matmul, shape.dense_matmul)
    return {"stage": stage, "dense full training": dense, "ratio": stage / dense}


def disk_bytes(shape: Shape, setup: Setup) -> dict[str, int]:
    """Bytes written per save: whole and slim model, and the optimizer states of a ``checkpoint-N``."""
    weight = DTYPE_BYTES[setup.dtype]
    # DeepSpeed holds (and saves) the whole model in the training dtype; without it LLaMA-Factory keeps the
    # trained tensors in fp32.
    trained_weight = 4 if setup.zero_stage == 0 else weight
    optimizer = (12 if weight == 2 and setup.zero_stage else 8) * shape.trained  # fp32 master copy + Adam moments
    return {
        "whole save": weight * (shape.total - shape.trained) + trained_weight * shape.trained,
        "slim save": trained_weight * shape.trained,
        "optimizer states per checkpoint-N": optimizer,
    }


def estimate(
    config_path: str | Path,
    setup: Setup,
    method: str | None = None,
    num_experts: int | list[int] | None = None,
    top_k: int | None = None,
    moe_layers: list[int] | None = None,
) -> Estimate:
    """The cost of ``setup``'s stage for the model of ``config_path`` (dense: upcycled with the expert settings
    given, ``moelpr upcycle``'s defaults otherwise; upcycled: as it is)."""
    config = upcycled_config(read_config(config_path), method, num_experts, top_k, moe_layers)
    setup.check(config.moe_method)
    shape = measure_shape(config, setup)
    memory, cpu = model_state_bytes(shape, setup)
    memory["activations"] = round(activation_bytes_per_token(shape, setup) * setup.micro_batch * setup.cutoff_len)
    memory["total"] = sum(memory.values())
    counts = config.num_experts if isinstance(config.num_experts, list) else [config.num_experts]
    experts = "-".join(str(c) for c in sorted(set(counts)))
    method_name = "MoE-CT" if config.moe_method == CT else f"MoE-LPR {setup.stage}"
    description = (
        f"{method_name}, {experts} experts top-{config.num_experts_per_tok} in {len(config.moe_layer_indices)} of "
        f"{config.num_hidden_layers} layers; {setup.gpus} GPU(s), "
        + (f"ZeRO-{setup.zero_stage}" if setup.zero_stage else "no DeepSpeed")
        + (", optimizer offloaded" if setup.offload_optimizer else "")
        + (", parameters offloaded" if setup.offload_params else "")
        + f", {setup.dtype}, micro-batch {setup.micro_batch} x {setup.cutoff_len} tokens, gradient checkpointing "
        + ("on" if setup.gradient_checkpointing else "off")
    )
    return Estimate(description, shape, setup, memory, cpu, disk_bytes(shape, setup), flops_per_token(shape, setup))
