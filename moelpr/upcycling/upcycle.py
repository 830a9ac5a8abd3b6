"""Upcycle a dense causal LM into its MoE form, preserving the function it computes.

Each chosen layer's FFN becomes the MoE block its model class names (``moe_block_class``), built from the FFN's
tensors by the block's ``upcycled_tensors``: for MoE-LPR, expert 0 is the FFN itself, experts 1..N-1 are its
copies and the router starts random. Because all experts are equal and the top-k weights are renormalised to sum
to one, the upcycled model's outputs equal the dense model's whatever the router says. For MoE-CT
(``method="moe_ct"``) the FFN stays whole beside N routed copies and a zero fusion layer, whose two weights sum
to one: the same argument holds.

The checkpoint is streamed, never loaded whole: dense tensors are read one at a time (an upcycled layer's FFN
tensors together) and every MoE tensor goes to its safetensors shard as soon as it is made. Memory holds one
upcycled layer's tensors (its N experts and router) or one other tensor at most, whatever the size of the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoints.model_dir import CONFIG_NAME, require_model_dir
from ..checkpoints.slim import DENSE_BASE, write_reference
from ..checkpoints.streaming import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    CheckpointError,
    CheckpointReader,
    ShardedWriter,
    TensorSpec,
    parse_size,
    staged_directory,
)
from ..models import MOE_FAMILIES
from ..models.configuration import CT, DEFAULT_EXPERTS
from .layer_allocation import (
    allocate_for_checkpoint,
    check_request,
    parse_auto_budget,
    write_allocation,
)
from .settings import NORMAL, ROUTER_INITS, XAVIER, UpcycleSettings, UpcyclingError, expert_layout, parse_layers

logger = logging.getLogger(__name__)

MODEL_FILES = (CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
GENERATION_CONFIG_NAME = "generation_config.json"
ADDING_A_FAMILY = "docs/adding_a_family.md"


def _check_paths(model_path: Path, output_path: Path) -> str:
    """The dense model's ``model_type`` once the directories pass the checks."""
    config_file = require_model_dir(model_path) / CONFIG_NAME
    if not any((model_path / f).is_file() for f in TOKENIZER_FILES):
        raise UpcyclingError(f"--model_path {model_path} has no tokenizer files; the upcycled checkpoint needs them.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MOE_FAMILIES:
        if model_type and model_type.endswith("_moelpr"):
            raise UpcyclingError(f"{model_path} is already an upcycled MoE-LPR model ({model_type}).")
        raise UpcyclingError(
            f"cannot upcycle model_type {model_type!r}: supported families are {', '.join(sorted(MOE_FAMILIES))} "
            f"(adding one takes two small files, see {ADDING_A_FAMILY})."
        )
    if output_path.exists() and (not output_path.is_dir() or any((output_path / f).exists() for f in MODEL_FILES)):
        raise UpcyclingError(f"--output_path {output_path} already holds a model; choose a new directory.")
    return model_type


@dataclass
class UpcyclingStep:
    """Output tensors made from some dense tensors: a copy (``layer`` None, one input, one output) or an upcycled
    layer's MoE block, whose tensors are named ``prefix`` + the block-relative names."""

    outputs: list[TensorSpec] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    layer: int | None = None
    prefix: str = ""


def _describe(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more)"


def _expected_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a checkpoint of ``model`` stores: its state dict without the aliases of tied weights
    (``lm_head.weight`` when the embeddings are tied), as ``save_pretrained`` writes it."""
    seen: set[int] = set()
    expected = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            expected[name] = tuple(tensor.shape)
    return expected


def _meta_rows(hidden_size: int, dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
    return lambda n: torch.empty(n, hidden_size, dtype=dtype, device="meta")


def router_std(init: str, hidden_size: int, num_experts: int, initializer_range: float) -> float:
    """Standard deviation of a ``[num_experts, hidden_size]`` router's initial weights: ``sqrt(2 / (hidden + N))``
    for ``xavier`` (fan-in + fan-out of the linear layer, gain 1), ``initializer_range`` for ``normal``."""
    if init == XAVIER:
        return math.sqrt(2.0 / (hidden_size + num_experts))
    if init == NORMAL:
        return initializer_range
    raise UpcyclingError(f"--router_init must be one of {', '.join(ROUTER_INITS)}, got {init!r}.")


def router_rows(
    seed: int, layer: int, hidden_size: int, dtype: torch.dtype, init: str = XAVIER, initializer_range: float = 0.02
) -> Callable[[int], torch.Tensor]:
    """``random_rows`` of one layer's block: ``randn(n, hidden) * router_std(init, ...)`` in ``dtype``. Each layer draws
    from its own generator seeded from ``(seed, layer)``, so the values do not depend on the order tensors are written
    in; successive calls continue the layer's stream."""
    digest = hashlib.sha256(f"moelpr-upcycle/{seed}/{layer}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return lambda n: (
        torch.randn(n, hidden_size, generator=generator) * router_std(init, hidden_size, n, initializer_range)
    ).to(dtype)


def plan_upcycling(reader: CheckpointReader, config, model_class: type) -> list[UpcyclingStep]:
    """What to write, in the dense checkpoint's order, checked against the MoE model's own tensors (built on the
    meta device, so nothing is allocated): an upcycled layer's block takes the place of its FFN's first tensor.

    The block's ``upcycled_tensors`` runs here on meta tensors (names, shapes and dtypes only), and again on the
    real tensors when they are written, so it must not read values and must make its tensors in a fixed order.
    """
    with torch.device("meta"):
        meta_model = model_class(config)
        expert = model_class.expert_class(config)
    expected = _expected_tensors(meta_model)
    ffn_shapes = {name: tuple(t.shape) for name, t in expert.state_dict().items()}
    module_names = {id(module): name for name, module in meta_model.named_modules()}
    prefixes = {i: module_names[id(meta_model.model.layers[i].mlp)] + "." for i in config.moe_layer_indices}
    layer_of_prefix = {prefix: i for i, prefix in prefixes.items()}
    block_class = model_class.moe_block_class(config)

    steps: list[UpcyclingStep] = []
    blocks: dict[int, UpcyclingStep] = {}
    ignored = []
    for name in reader.names():
        prefix = name[: name.rfind(".mlp.") + len(".mlp.")] if ".mlp." in name else ""
        layer = layer_of_prefix.get(prefix)
        if layer is not None:
            if layer not in blocks:
                blocks[layer] = UpcyclingStep(layer=layer, prefix=prefix)
                steps.append(blocks[layer])
            blocks[layer].inputs.append(name)
        elif name in expected:
            spec = reader.spec(name)
            if spec.shape != expected[name]:
                raise UpcyclingError(
                    f"{name} has shape {list(spec.shape)} in the checkpoint but {list(expected[name])} by its "
                    "config.json; the dense checkpoint does not match its config."
                )
            steps.append(UpcyclingStep(outputs=[spec], inputs=[name]))
        else:
            ignored.append(name)
    if ignored:
        logger.warning("Left out %s: not a weight of the model (transformers ignores it too).", _describe(ignored))

    family = config.model_type.removesuffix("_moelpr")
    for layer, prefix in prefixes.items():
        step = blocks.get(layer)
        found = {name.removeprefix(prefix): reader.spec(name) for name in step.inputs} if step else {}
        if set(found) != set(ffn_shapes):
            raise UpcyclingError(
                f"layer {layer}'s FFN ({prefix}*) holds {sorted(found) or 'no tensors'} in the checkpoint, but a "
                f"{family} FFN has {sorted(ffn_shapes)}."
            )
        bad_shapes = [name for name, spec in found.items() if spec.shape != ffn_shapes[name]]
        if bad_shapes:
            raise UpcyclingError(
                f"{prefix}{bad_shapes[0]} has shape {list(found[bad_shapes[0]].shape)} but "
                f"{list(ffn_shapes[bad_shapes[0]])} by config.json; the dense checkpoint does not match its config."
            )
        ffn = {name: torch.empty(spec.shape, dtype=spec.dtype, device="meta") for name, spec in found.items()}
        rows = _meta_rows(config.hidden_size, next(iter(ffn.values())).dtype)
        block = block_class.upcycled_tensors(ffn, config.num_experts_of(layer), rows)
        step.outputs = [TensorSpec(prefix + name, tuple(t.shape), t.dtype) for name, t in block.items()]

    planned = {spec.name: spec.shape for step in steps for spec in step.outputs}
    missing = [name for name in expected if name not in planned]
    if missing:
        raise UpcyclingError(f"the dense checkpoint lacks {_describe(missing)}, which its config.json implies.")
    mismatched = [name for name in planned if expected.get(name) != planned[name]]
    if mismatched:  # the block's upcycled_tensors disagrees with the block's own parameters
        raise RuntimeError(
            f"upcycled tensor {mismatched[0]} is not a tensor of {model_class.__name__} (or not its shape)"
        )
    return steps


def _block_tensors(
    ffn: dict[str, torch.Tensor], step: UpcyclingStep, config, block_class: type, seed: int, router_init: str
) -> dict[str, torch.Tensor]:
    """One upcycled block's tensors (checkpoint names) from its layer's FFN tensors (names inside the FFN)."""
    dtype = next(iter(ffn.values())).dtype
    rows = router_rows(seed, step.layer, config.hidden_size, dtype, router_init, config.initializer_range)
    block = block_class.upcycled_tensors(ffn, config.num_experts_of(step.layer), rows)
    return {step.prefix + name: tensor for name, tensor in block.items()}


def _step_tensors(
    reader: CheckpointReader, step: UpcyclingStep, config, block_class: type, seed: int, router_init: str
) -> dict[str, torch.Tensor]:
    if step.layer is None:
        return {step.outputs[0].name: reader.get(step.inputs[0])}
    ffn = {name.removeprefix(step.prefix): reader.get(name) for name in step.inputs}
    return _block_tensors(ffn, step, config, block_class, seed, router_init)


def new_block_tensors(
    reader: CheckpointReader, steps: list[UpcyclingStep], config, block_class: type, seed: int, router_init: str
) -> dict[str, torch.Tensor]:
    """What a slim upcycle stores: the tensors each upcycled block makes anew (routers, MoE-CT's fusion layers),
    the same values :func:`write_upcycled` writes. The FFN is not read (meta tensors stand in for it): its expert
    copies are made at load time."""
    tensors = {}
    for step in steps:
        if step.layer is None:
            continue
        specs = {name.removeprefix(step.prefix): reader.spec(name) for name in step.inputs}
        ffn = {name: torch.empty(spec.shape, dtype=spec.dtype, device="meta") for name, spec in specs.items()}
        block = _block_tensors(ffn, step, config, block_class, seed, router_init)
        tensors.update({name: tensor for name, tensor in block.items() if not tensor.is_meta})
    return tensors


def write_upcycled(
    reader: CheckpointReader,
    steps: list[UpcyclingStep],
    writer: ShardedWriter,
    config,
    block_class: type,
    seed: int,
    router_init: str = XAVIER,
) -> None:
    """Make and write the planned tensors, one step (one tensor, or one layer's block) in memory at a time."""
    with tqdm(total=sum(len(step.outputs) for step in steps), desc="upcycling", unit="tensor", disable=None) as bar:
        for step in steps:
            tensors = _step_tensors(reader, step, config, block_class, seed, router_init)
            while tensors:  # popped as written, so that no reference outlives the step
                name = next(iter(tensors))
                writer.write(name, tensors.pop(name))
                bar.update()


def upcycle(model_path: str | Path, output_path: str | Path, settings: UpcycleSettings | None = None) -> Path:
    """Write the upcycled checkpoint (weights, config, generation config, tokenizer) of the dense safetensors
    checkpoint at ``model_path`` as ``settings`` ask (default: MoE-LPR with 4 experts, top-2, in every layer; see
    :class:`~moelpr.upcycling.settings.UpcycleSettings`). An ``auto:K`` allocation is saved beside it as
    ``layer_allocation.json``. The output appears whole or not at all (see
    :func:`~moelpr.checkpoints.streaming.staged_directory`).
    """
    from transformers import AutoConfig, AutoTokenizer

    settings = settings or UpcycleSettings()
    moe_method = settings.moe_method
    default_experts, default_top_k = DEFAULT_EXPERTS[moe_method]
    num_experts = default_experts if settings.num_experts is None else settings.num_experts
    top_k = default_top_k if settings.top_k is None else settings.top_k
    moe_layers, new_corpora, old_corpora = settings.moe_layers, settings.new_corpora, settings.old_corpora
    model_path, output_path = Path(model_path), Path(output_path)
    model_type = _check_paths(model_path, output_path)
    budget = parse_auto_budget(str(num_experts))
    if budget is not None and moe_method == CT:
        raise UpcyclingError(
            "--num_experts auto:K spreads MoE-LPR's new experts (the original FFN being expert 0) and is not "
            "available with --method moe_ct; give a count or per-layer counts of routed experts."
        )
    if budget is None and (new_corpora or old_corpora):
        raise UpcyclingError("--new_corpus and --old_corpus are read only with --num_experts auto:K.")
    if budget is not None:
        check_request(budget, new_corpora or [], old_corpora or [])
        if top_k > 2:
            raise UpcyclingError(
                f"--topk {top_k} with --num_experts auto:{budget}: a layer may get a single new expert (2 in all), "
                "so top-k can be at most 2."
            )
    try:
        max_shard_bytes = parse_size(settings.max_shard_size)
    except CheckpointError as error:
        raise UpcyclingError(f"--max_shard_size: {error}.") from None
    dense_config = AutoConfig.from_pretrained(model_path)
    allocation = None
    if budget is not None:
        candidates = (
            parse_layers(moe_layers, dense_config.num_hidden_layers) if isinstance(moe_layers, str) else moe_layers
        )
        allocation = allocate_for_checkpoint(
            model_path, budget, new_corpora, old_corpora, layers=candidates, max_tokens=settings.allocation_max_tokens
        )
        logger.info("LayerMoE allocation of %d new experts:\n%s", budget, allocation.table())
        num_experts, moe_layers = allocation.spec, None
    layers, counts = expert_layout(num_experts, moe_layers, top_k, dense_config.num_hidden_layers, moe_method)
    config_class, model_class = MOE_FAMILIES[model_type]
    config = config_class.from_dense(
        dense_config, moe_method=moe_method, num_experts=counts, num_experts_per_tok=top_k, moe_layers=layers
    )
    config.architectures = [model_class.__name__]
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    try:
        with CheckpointReader(model_path) as reader:
            steps = plan_upcycling(reader, config, model_class)
            with staged_directory(output_path) as staging:
                block_class = model_class.moe_block_class(config)
                if settings.slim:
                    tensors = new_block_tensors(reader, steps, config, block_class, settings.seed, settings.router_init)
                    layout = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
                else:
                    layout = [spec for step in steps for spec in step.outputs]
                writer = ShardedWriter(staging, layout, max_shard_bytes)
                try:
                    if settings.slim:
                        for name, tensor in tensors.items():
                            writer.write(name, tensor)
                    else:
                        write_upcycled(reader, steps, writer, config, block_class, settings.seed, settings.router_init)
                finally:
                    writer.close()
                writer.finish()
                if settings.slim:
                    write_reference(staging, model_path, DENSE_BASE, final_dir=output_path)
                config.save_pretrained(staging)
                if (model_path / GENERATION_CONFIG_NAME).is_file():
                    shutil.copyfile(model_path / GENERATION_CONFIG_NAME, staging / GENERATION_CONFIG_NAME)
                tokenizer.save_pretrained(staging)
                if allocation is not None:
                    write_allocation(allocation, staging)
    except CheckpointError as error:  # an unreadable dense checkpoint (a truncated shard shows only when read)
        raise UpcyclingError(f"{error}.") from None
    return output_path
