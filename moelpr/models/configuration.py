"""MoE-LPR settings shared by the model families' configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import MoELPRUserError

# How MoE layers may run their experts (``expert_dispatch.run_experts``).
EXPERTS_IMPLEMENTATIONS = ("auto", "grouped", "loop")

LPR = "lpr"
CT = "ct"
# The methods as users name them (``moelpr upcycle --method``, the ``moelpr_method`` YAML key) -> ``moe_method``.
METHOD_NAMES = {"moe_lpr": LPR, "moe_ct": CT}
# (num_experts, num_experts_per_tok) when the user gives none: MoE-LPR's paper setting, and MoE-CT's two routed
# experts (the authors' 1.8B configuration) with top-1, the default of DeepSpeed's residual MoE they build on.
DEFAULT_EXPERTS = {LPR: (4, 2), CT: (2, 1)}
# The LPR loss on router logits (the paper's formula) or on router probabilities (the authors' code: a second softmax).
PAPER, AUTHORS = "paper", "authors"
LPR_LOSS_FORMS = (PAPER, AUTHORS)


class ExpertsImplementationError(MoELPRUserError, ValueError):
    """A ``moe_experts_implementation`` that is unknown, or that cannot run these experts on these tensors."""


def check_experts_implementation(implementation: str) -> None:
    if implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ExpertsImplementationError(
            f"moe_experts_implementation must be one of {list(EXPERTS_IMPLEMENTATIONS)}, got {implementation!r}."
        )


@dataclass(kw_only=True, repr=False)
class MoELPRConfigMixin:
    r"""Fields and checks every ``*_moelpr`` config adds to its dense family's config.

    moe_method: ``"lpr"`` (MoE-LPR: the original FFN is expert 0 of the routed experts) or ``"ct"`` (MoE-CT: the
        original FFN stays outside the router, always active, mixed with the routed experts by a learned fusion
        layer; see ``moe_ct.py``).
    num_experts: experts per MoE layer; or one count per MoE layer (in the order of ``moe_layer_indices``) when
        layers get different numbers of experts. MoE-LPR counts the original FFN as expert 0; MoE-CT counts only
        the routed experts (the original FFN comes on top).
    num_experts_per_tok: top-k experts each token is routed to.
    moe_layers: indices of the upcycled layers; ``None`` upcycles every layer, the others stay dense.
    router_aux_loss_coef: weight of the load-balancing loss.
    lpr_loss_coef: weight of the Language Priors Routing loss (review stage).
    lpr_loss_form: ``"paper"`` (cross-entropy of the router logits toward expert 0, the paper's formula) or
        ``"authors"`` (the same cross-entropy applied to the router's softmax outputs, as the authors' code does: a
        second softmax, which weakens the gradient; see ``routing.lpr_loss``).
    output_router_logits: return router logits in the model output.
    moe_experts_implementation: how each MoE layer runs its experts: ``"grouped"`` (all experts in one grouped
        GEMM per projection, ``torch._grouped_mm``, no host sync), ``"loop"`` (one expert after another) or
        ``"auto"`` (grouped where it is available, faster and known to be right: CUDA in bf16 on compute
        capability 8.x and 9.x; the loop otherwise, see ``expert_dispatch.auto_groups_experts``). Same results
        either way (see ``expert_dispatch.run_experts``). The MoE blocks read it at every forward, so setting
        ``model.config.moe_experts_implementation`` on a built model switches them all.
    """

    moe_method: str = LPR
    num_experts: int | list[int] = 4
    num_experts_per_tok: int = 2
    moe_layers: list[int] | None = None
    router_aux_loss_coef: float = 0.01
    lpr_loss_coef: float = 0.0
    lpr_loss_form: str = PAPER
    output_router_logits: bool = False
    moe_experts_implementation: str = "auto"

    def validate_moe(self) -> None:
        check_experts_implementation(self.moe_experts_implementation)
        if self.moe_method not in DEFAULT_EXPERTS:
            raise ValueError(f"moe_method must be one of {sorted(DEFAULT_EXPERTS)}, got {self.moe_method!r}.")
        if self.lpr_loss_form not in LPR_LOSS_FORMS:
            raise ValueError(f"lpr_loss_form must be one of {list(LPR_LOSS_FORMS)}, got {self.lpr_loss_form!r}.")
        if self.moe_method == CT and self.lpr_loss_coef:
            raise ValueError(
                "lpr_loss_coef must be 0 for MoE-CT: the LPR loss routes old-language tokens to the original FFN, "
                f"which MoE-CT keeps outside the router; got {self.lpr_loss_coef}."
            )
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
            if bad or not self.moe_layers:
                raise ValueError(
                    f"moe_layers must be a non-empty list of layer indices in [0, {self.num_hidden_layers}), "
                    f"got {self.moe_layers}."
                )
            self.moe_layers = sorted(set(self.moe_layers))
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
        if isinstance(self.num_experts, list) and len(counts) != len(self.moe_layer_indices):
            raise ValueError(
                f"num_experts lists one count per MoE layer ({len(self.moe_layer_indices)} layers), got {len(counts)}."
            )
        if self.moe_method == LPR and min(counts) < 2:
            raise ValueError(f"every MoE layer needs at least 2 experts (expert 0 plus new experts), got {counts}.")
        if min(counts) < 1:
            raise ValueError(f"every MoE-CT layer needs at least 1 routed expert, got {counts}.")
        if not 1 <= self.num_experts_per_tok <= min(counts):
            raise ValueError(
                f"num_experts_per_tok (top-k) must be between 1 and the smallest expert count ({min(counts)}), "
                f"got {self.num_experts_per_tok}."
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_layers is None or layer_idx in self.moe_layers

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def num_experts_of(self, layer_idx: int) -> int:
        """Experts of MoE layer ``layer_idx``."""
        if isinstance(self.num_experts, int):
            return self.num_experts
        return self.num_experts[self.moe_layer_indices.index(layer_idx)]

    @property
    def max_num_experts(self) -> int:
        return max(self.num_experts) if isinstance(self.num_experts, list) else self.num_experts

    @classmethod
    def from_dense(cls, dense_config: Any, **moe_fields: Any) -> MoELPRConfigMixin:
        """The MoE config of an upcycled ``dense_config`` (same architecture fields, same dtype)."""
        fields = dense_config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            fields.pop(key, None)
        return cls(**fields, **moe_fields)


def dense_only_tp_plan(dense_config_class: type) -> dict[str, str]:
    """The family's tensor-parallel plan without the entries naming the dense FFN, absent in MoE layers."""
    return {k: v for k, v in dense_config_class.base_model_tp_plan.items() if ".mlp." not in k}
