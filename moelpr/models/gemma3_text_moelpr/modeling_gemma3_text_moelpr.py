"""``gemma3_text_moelpr``: Gemma 3 text causal LM whose chosen FFNs are upcycled MoE-LPR blocks.

The block takes the place of ``mlp`` only: Gemma's pre- and post-feed-forward norms stay around it in the decoder
layer, as do its scaled embeddings, sliding-window layers and final logit soft-capping, so an upcycled layer
computes ``post_norm(block(pre_norm(x)))`` where the dense one computed ``post_norm(mlp(pre_norm(x)))``.
"""

from __future__ import annotations

from transformers import Gemma3ForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP

from ..modeling import MoELPRForCausalLMMixin
from .configuration_gemma3_text_moelpr import Gemma3TextMoELPRConfig


class Gemma3TextMoELPRForCausalLM(MoELPRForCausalLMMixin, Gemma3ForCausalLM):
    config_class = Gemma3TextMoELPRConfig
    config: Gemma3TextMoELPRConfig
    expert_class = Gemma3MLP


__all__ = ["Gemma3TextMoELPRForCausalLM"]
