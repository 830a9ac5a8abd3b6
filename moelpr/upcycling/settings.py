"""What an upcycling request is: :class:`UpcycleSettings`, and the reading of its layer and expert-count options
(``--moe_layers``, ``--num_experts``) into the MoE config's ``moe_layers`` and ``num_experts``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.streaming import DEFAULT_MAX_SHARD_SIZE
from ..errors import MoELPRUserError
from ..models.configuration import CT, METHOD_NAMES
from .layer_allocation import DEFAULT_MAX_TOKENS

# How routers start: "xavier" is torch.nn.init.xavier_normal_ as the MoE-LPR authors' code applies it; "normal" is
# the family's _init_weights (randn * initializer_range), this project's choice before the authors' was matched.
XAVIER, NORMAL = "xavier", "normal"
ROUTER_INITS = (XAVIER, NORMAL)


class UpcyclingError(MoELPRUserError, ValueError):
    """A user-facing problem with the upcycling request."""


@dataclass(frozen=True)
class UpcycleSettings:
    """How :func:`~moelpr.upcycling.upcycle.upcycle` turns a dense checkpoint into an MoE one.

    ``method`` is ``"moe_lpr"`` or ``"moe_ct"``. ``num_experts`` is a count for every upcycled layer (``moe_layers``
    picks them: ``None``/``"all"``, ``"every:K"``, ``"0,2,5-7"`` or a list) or per-layer counts like
    ``"0-9:2,10-29:4"`` (layers left out stay dense), or ``"auto:K"`` (MoE-LPR only): K new experts spread over the
    layers (``moe_layers`` the candidates) by the cross-lingual similarity of the dense model's hidden states on
    ``new_corpora`` and ``old_corpora``, read up to ``allocation_max_tokens`` tokens each (LayerMoE; see
    :mod:`moelpr.upcycling.layer_allocation`). MoE-LPR counts the original FFN as expert 0, MoE-CT counts the routed
    experts only; ``num_experts`` and ``top_k`` default to the method's (4 and 2 for MoE-LPR, 2 and 1 for MoE-CT).
    ``router_init`` is ``"xavier"`` (the MoE-LPR authors' ``xavier_normal_``) or ``"normal"``
    (``randn * initializer_range``), drawn from ``seed``. Weights are written in shards of at most
    ``max_shard_size`` (``"5GB"``, bytes...). ``slim`` writes the routers (and fusion layers) only, with a reference
    to the dense model from which the experts are copied at load time (docs/checkpoints.md).
    """

    method: str = "moe_lpr"
    num_experts: int | str | None = None
    top_k: int | None = None
    moe_layers: list[int] | str | None = None
    router_init: str = XAVIER
    seed: int = 0
    slim: bool = False
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    new_corpora: list[Path] | None = None
    old_corpora: list[Path] | None = None
    allocation_max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise UpcyclingError(f"--method must be one of {', '.join(METHOD_NAMES)}, got {self.method!r}.")
        if self.router_init not in ROUTER_INITS:
            raise UpcyclingError(f"--router_init must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}.")

    @property
    def moe_method(self) -> str:
        """The config's ``moe_method`` (``"lpr"`` or ``"ct"``)."""
        return METHOD_NAMES[self.method]


def parse_layers(spec: str | None, num_layers: int) -> list[int] | None:
    """``None``/``"all"`` -> every layer; ``"0,2,5-7"`` -> those layers; ``"every:2"`` -> 0, 2, 4, ..."""
    if spec is None or spec.strip().lower() == "all":
        return None
    spec = spec.strip()
    try:
        if spec.startswith("every:"):
            layers = list(range(0, num_layers, int(spec.split(":", 1)[1])))
        else:
            layers = []
            for part in spec.split(","):
                start, _, end = part.partition("-")
                layers.extend(range(int(start), int(end or start) + 1))
    except ValueError:
        raise UpcyclingError(f"--moe_layers {spec!r} is not 'all', 'every:K' or a list like '0,2,5-7'.") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise UpcyclingError(f"--moe_layers {spec!r} names layers outside 0..{num_layers - 1}: {bad or 'none'}.")
    return sorted(set(layers))


def _minimum_experts(moe_method: str) -> tuple[int, str]:
    """The smallest expert count of an upcycled layer, and why."""
    if moe_method == CT:
        return 1, "one routed expert beside the original FFN"
    return 2, "the original FFN plus new experts"


def parse_expert_counts(spec: str, num_layers: int, moe_method: str = "lpr") -> dict[int, int]:
    """``"0-9:2,10-29:4"`` -> experts per upcycled layer (``"5:3"`` names one layer); layers left out stay dense."""
    minimum, reason = _minimum_experts(moe_method)
    counts: dict[int, int] = {}
    for part in spec.split(","):
        layers, _, count_text = part.strip().partition(":")
        start_text, _, end_text = layers.partition("-")
        try:
            start, end, count = int(start_text), int(end_text or start_text), int(count_text)
        except ValueError:
            raise UpcyclingError(
                f"--num_experts {spec!r}: {part.strip()!r} is not LAYERS:COUNT (per-layer counts look like "
                "'0-9:2,10-29:4')."
            ) from None
        if not 0 <= start <= end < num_layers:
            raise UpcyclingError(
                f"--num_experts {spec!r}: {part.strip()!r} names layers outside 0..{num_layers - 1} "
                "(or an empty range)."
            )
        if count < minimum:
            raise UpcyclingError(
                f"--num_experts {spec!r}: {part.strip()!r} gives {count} experts; an upcycled layer needs at least "
                f"{minimum} ({reason})."
            )
        overlap = [i for i in range(start, end + 1) if i in counts]
        if overlap:
            raise UpcyclingError(f"--num_experts {spec!r}: layer(s) {overlap} fall in more than one range.")
        counts.update(dict.fromkeys(range(start, end + 1), count))
    return counts


def expert_layout(
    num_experts: int | str, moe_layers: list[int] | str | None, top_k: int, num_layers: int, moe_method: str = "lpr"
) -> tuple[list[int] | None, int | list[int]]:
    """``--num_experts`` (a count, or per-layer counts) and ``--moe_layers`` -> the config's ``moe_layers`` and
    ``num_experts``. Per-layer counts that are all equal give a single count."""
    text = str(num_experts).strip()
    minimum, reason = _minimum_experts(moe_method)
    if ":" not in text:
        try:
            count = int(text)
        except ValueError:
            raise UpcyclingError(
                f"--num_experts {text!r} is neither a count (like 4) nor per-layer counts (like '0-9:2,10-29:4')."
            ) from None
        if count < minimum:
            raise UpcyclingError(f"--num_experts must be at least {minimum} ({reason}), got {count}.")
        if not 1 <= top_k <= count:
            raise UpcyclingError(f"--topk must be between 1 and --num_experts ({count}), got {top_k}.")
        if isinstance(moe_layers, list):
            return parse_layers(",".join(map(str, moe_layers)), num_layers), count
        return parse_layers(moe_layers, num_layers), count
    if moe_layers is not None:
        raise UpcyclingError(
            f"--num_experts {text!r} names the upcycled layers itself; leave out --moe_layers ({moe_layers!r})."
        )
    counts = parse_expert_counts(text, num_layers, moe_method)
    if not 1 <= top_k <= min(counts.values()):
        raise UpcyclingError(
            f"--topk must be between 1 and the smallest expert count in --num_experts ({min(counts.values())}), "
            f"got {top_k}."
        )
    layers = sorted(counts)
    per_layer = [counts[i] for i in layers]
    if len(set(per_layer)) > 1:
        return layers, per_layer
    return (None if layers == list(range(num_layers)) else layers), per_layer[0]
