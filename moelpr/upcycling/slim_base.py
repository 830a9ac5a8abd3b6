"""The layout of a slim checkpoint's dense base: which tensors of the upcycled model are copies of the dense model's
(every expert of a block from its layer's FFN) and which the upcycler makes anew, as ``moelpr upcycle`` writes them.

The checkpoint layer reads slim checkpoints but knows no model family: ``import moelpr`` registers
:func:`dense_base_layout` with it (moelpr.checkpoints.slim.register_dense_base_layout).
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoConfig

from ..checkpoints.slim import SlimCheckpointError
from ..checkpoints.streaming import CheckpointReader
from ..models import MOE_FAMILIES
from .upcycle import UpcyclingError, plan_upcycling

# An upcycled expert tensor: ``original_expert.<ffn tensor>`` or ``new_experts.<j>.<ffn tensor>``.
_EXPERT_COPY = re.compile(r"^(?:original_expert|new_experts\.\d+)\.(.+)$")


def dense_base_layout(dense: CheckpointReader, slim_dir: Path) -> dict[str, str | None]:
    """Every tensor of the model ``slim_dir``'s config.json describes, in ``moelpr upcycle``'s order, mapped to the
    tensor of ``dense`` it copies, or to None for one the upcycler makes anew (the slim checkpoint holds those)."""
    config = AutoConfig.from_pretrained(slim_dir)
    model_class = MOE_FAMILIES[config.model_type.removesuffix("_moelpr")][1]
    try:
        steps = plan_upcycling(dense, config, model_class)
    except UpcyclingError as error:
        message = f"slim checkpoint {slim_dir}: its dense base {dense.model_dir} does not fit: {error}"
        raise SlimCheckpointError(message) from None
    layout: dict[str, str | None] = {}
    for step in steps:
        if step.layer is None:
            layout[step.outputs[0].name] = step.inputs[0]
            continue
        for spec in step.outputs:
            copy = _EXPERT_COPY.match(spec.name.removeprefix(step.prefix))
            copied = step.prefix + copy.group(1) if copy else None
            layout[spec.name] = copied if copied in step.inputs else None
    return layout
