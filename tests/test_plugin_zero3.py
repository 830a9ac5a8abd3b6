"""Under DeepSpeed ZeRO-3 the MoE block is a leaf module, as LLaMA-Factory makes its own MoE blocks.

Runs where ``deepspeed`` is installed (it is optional: only the ZeRO recipes need it).
"""

from __future__ import annotations

import pytest
from llamafactory.model import patcher
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from moelpr.llamafactory_plugin import apply
from moelpr.models import MoELPRSparseBlock

deepspeed_utils = pytest.importorskip("deepspeed.utils")
apply()  # what the startup hook does in llamafactory-cli


def test_moe_block_is_a_zero3_leaf_module(upcycled_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(upcycled_llama_dir)
    patcher.add_z3_leaf_module(model)
    assert deepspeed_utils.get_z3_leaf_modules(model) == []  # ZeRO-3 off: nothing to do

    # transformers reports ZeRO-3 as enabled while this config object is alive.
    zero3_config = HfDeepSpeedConfig({"train_batch_size": 1, "zero_optimization": {"stage": 3}})
    patcher.add_z3_leaf_module(model)
    leaves = deepspeed_utils.get_z3_leaf_modules(model)
    assert leaves and len(leaves) == len(model.moe_blocks())
    assert all(isinstance(m, MoELPRSparseBlock) for m in leaves)
    del zero3_config
