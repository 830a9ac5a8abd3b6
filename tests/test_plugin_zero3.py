"""Under DeepSpeed ZeRO-3 the MoE block is a leaf module, as LLaMA-Factory makes its own MoE blocks.

DeepSpeed is pinned in requirements.txt; on a CPU-only machine it imports with its CPU accelerator,
enough to check the registration (test_plugin_deepspeed.py trains under ZeRO-3).
"""

from __future__ import annotations

import deepspeed.utils as deepspeed_utils
from llamafactory.model import patcher
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from moelpr.llamafactory_plugin import apply
from moelpr.models import MoELPRSparseBlock

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
