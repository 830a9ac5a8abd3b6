"""``--num_experts auto:K``: spread K new experts over the layers as LayerMoE (arXiv 2505.22582) does.

A layer whose FFN inputs look alike across languages is language-agnostic and needs few new experts; a
layer where the new languages' inputs point elsewhere than the old languages' needs more. Per decoder layer
this module measures the LayerMoE similarity of the FFN inputs (the hidden states after attention, after the
post-attention norm: what the MoE router sees) on the user's old- and new-language corpora, then hands out the
K new experts in inverse proportion to it (Adams' apportionment, which reproduces the authors' released
allocation). Layers that receive no new expert stay dense. The rule, and where it departs from the authors,
is in docs/layer_allocation.md.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoints.model_dir import require_model_dir
from ..errors import MoELPRUserError
from ..jsonl_texts import iter_jsonl_texts

AUTO_PREFIX = "auto:"
ALLOCATION_FILE = "layer_allocation.json"
# The authors measure 100,000 tokens per language; on the demo corpora 5,000 and 20,000 tokens gave
# similarities within 0.004 of each other (docs/layer_allocation.md), and CPU time is what users lack.
DEFAULT_MAX_TOKENS = 20_000
DEFAULT_MAX_LENGTH = 1024


class AllocationError(MoELPRUserError, ValueError):
    """A user-facing problem with an ``auto:K`` request (budget, corpora, similarities)."""


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise AllocationError(f"auto:K needs a whole number K >= 1 of new experts, got {budget!r}.")


def parse_auto_budget(spec: str) -> int | None:
    """``"auto:K"`` -> K (new experts to spread); any other ``--num_experts`` value -> ``None``."""
    spec = spec.strip()
    if not spec.lower().startswith(AUTO_PREFIX):
        return None
    value = spec[len(AUTO_PREFIX) :].strip()
    if not value.isdigit() or int(value) < 1:
        raise AllocationError(f"--num_experts {spec!r}: auto:K needs a whole number K >= 1 of new experts to spread.")
    return int(value)


def allocate_new_experts(similarities: Sequence[float], budget: int, layers: Sequence[int] | None = None) -> list[int]:
    """New experts per layer (index = layer), summing to ``budget``: the lower a layer's similarity, the more.

    Adams' method with weights ``1 / similarity``: every candidate layer starts with its one original expert,
    and each new expert in turn goes to the layer with the largest ``1 / (similarity * experts so far)``;
    exact ties go to the lower layer index. This is LayerMoE's ``ceil(C / similarity / sum(1 / similarity))``
    total experts per layer with C chosen so the new experts sum to exactly ``budget``. ``layers`` restricts
    the candidates (the others get none).
    """
    _check_budget(budget)
    candidates = range(len(similarities)) if layers is None else sorted(set(layers))
    if not candidates:
        raise AllocationError("no candidate layers to place new experts in.")
    outside = [i for i in candidates if not 0 <= i < len(similarities)]
    if outside:
        raise AllocationError(f"layers {outside} are outside 0..{len(similarities) - 1}.")
    bad = {i: similarities[i] for i in candidates if not (math.isfinite(similarities[i]) and similarities[i] > 0)}
    if bad:
        # 1 / similarity orders layers only while similarities are positive (they are, in practice: LLM
        # hidden states share a common direction); a zero or negative value means the measurement failed.
        shown = ", ".join(f"layer {i}: {value:.4g}" for i, value in bad.items())
        raise AllocationError(f"LayerMoE's rule needs positive similarities, got {shown}.")
    new_experts = [0] * len(similarities)
    # Priority = similarity * experts the layer would have before this one; smallest first.
    heap = [(float(similarities[i]), i) for i in candidates]
    heapq.heapify(heap)
    for _ in range(budget):
        _, layer = heapq.heappop(heap)
        new_experts[layer] += 1
        heapq.heappush(heap, (float(similarities[layer]) * (new_experts[layer] + 1), layer))
    return new_experts


def layer_spec(moe_layers: Sequence[int], num_experts: Sequence[int]) -> str:
    """The explicit per-layer ``--num_experts`` form of an allocation, e.g. ``"0-2:5,3:4,6-17:2"``."""
    parts: list[tuple[int, int, int]] = []  # first layer, last layer, experts
    for layer, count in zip(moe_layers, num_experts):
        if parts and parts[-1][1] == layer - 1 and parts[-1][2] == count:
            parts[-1] = (parts[-1][0], layer, count)
        else:
            parts.append((layer, layer, count))
    return ",".join(f"{a}:{n}" if a == b else f"{a}-{b}:{n}" for a, b, n in parts)


def first_token_ids(tokenizer, texts: Iterable[str], max_tokens: int, max_length: int) -> list[list[int]]:
    """Token ids of the leading documents, each cut to ``max_length``, ``max_tokens`` in all (the last one cut
    to fit). Tokenised as the authors do, with the tokenizer's special tokens."""
    documents, total = [], 0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"][: max_tokens - total]
        if ids:
            documents.append(ids)
            total += len(ids)
        if total >= max_tokens:
            break
    return documents


@torch.inference_mode()
def corpus_directions(
    model: torch.nn.Module, documents: Sequence[Sequence[int]], batch_size: int = 8, desc: str = "similarity"
) -> torch.Tensor:
    """Mean unit FFN input per layer, ``[layers, hidden]`` in float64, over every token of ``documents``
    (padding excluded).

    The mean over all token pairs of the cosine between two corpora's FFN inputs equals the dot product of
    their mean unit vectors, so this sum is all LayerMoE's pairwise measure needs (O(layers x hidden) memory,
    where the authors hold a 100,000 x 100,000 cosine matrix per layer).
    """
    if not documents:
        raise AllocationError(f"{desc}: no tokens to measure.")
    decoder = model.get_decoder()
    layers = decoder.layers
    device = next(model.parameters()).device
    # The sums stay on the model's device: a host copy per layer and batch would stall a GPU every layer.
    sums = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float64, device=device)
    batch_mask: list[torch.Tensor] = []

    def capture(layer_idx: int):
        def hook(module, args):
            hidden = args[0][batch_mask[0]]  # [real tokens, hidden]
            sums[layer_idx] += F.normalize(hidden.float(), dim=-1).sum(dim=0, dtype=torch.float64)

        return hook

    handles = [layer.mlp.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    # Length-sorted batches waste little on padding; right padding leaves the real tokens' states unchanged.
    order = sorted(range(len(documents)), key=lambda j: len(documents[j]))
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
            batch = [documents[j] for j in order[start : start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = True
            batch_mask[:] = [mask.to(device)]
            decoder(input_ids=input_ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums.cpu() / sum(len(ids) for ids in documents)


@dataclass
class LayerSimilarity:
    """LayerMoE's per-layer similarity between the new and the old language groups."""

    pairs: dict[tuple[str, str], list[float]]  # (new, new or old corpus) -> per layer mean pairwise cosine
    new_old: list[float]  # mean over the new x old pairs
    new_new: list[float] | None  # mean over the new x new pairs (None with one new corpus)
    values: list[float]  # what the allocation uses: mean of the two means above (new_old alone if no new_new)


def layer_similarity(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> LayerSimilarity:
    """Similarities from the mean unit FFN inputs ``[layers, hidden]`` of each new and old corpus.

    As in the authors' released allocation sheet: the similarity of a layer is the average of (mean over
    new x new corpus pairs) and (mean over new x old corpus pairs); with a single new corpus, the latter.
    """
    if not new or not old:
        raise AllocationError("the similarity needs at least one new-language and one old-language corpus.")

    def pair_means(
        keys: list[tuple[str, str]], group: Mapping[str, torch.Tensor]
    ) -> dict[tuple[str, str], torch.Tensor]:
        return {(a, b): (new[a] * group[b]).sum(dim=-1) for a, b in keys}

    new_new_pairs = pair_means(list(combinations(new, 2)), new)
    new_old_pairs = pair_means([(a, b) for a in new for b in old], old)
    new_old = torch.stack(list(new_old_pairs.values())).mean(dim=0)
    new_new = torch.stack(list(new_new_pairs.values())).mean(dim=0) if new_new_pairs else None
    values = new_old if new_new is None else (new_new + new_old) / 2
    return LayerSimilarity(
        pairs={key: value.tolist() for key, value in {**new_new_pairs, **new_old_pairs}.items()},
        new_old=new_old.tolist(),
        new_new=None if new_new is None else new_new.tolist(),
        values=values.tolist(),
    )


@dataclass
class LayerAllocation:
    """The outcome of ``auto:K``: which layers become MoE layers, with how many experts, and why."""

    budget: int
    similarity: LayerSimilarity
    new_experts: list[int]  # per decoder layer
    corpora: dict[str, dict] = field(default_factory=dict)  # name -> role, path, tokens, documents, max_length

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, n in enumerate(self.new_experts) if n > 0]

    @property
    def num_experts(self) -> list[int]:
        """Experts per MoE layer (expert 0 plus the new ones), aligned with ``moe_layers``."""
        return [n + 1 for n in self.new_experts if n > 0]

    @property
    def spec(self) -> str:
        return layer_spec(self.moe_layers, self.num_experts)

    def to_dict(self) -> dict:
        sim = self.similarity
        return {
            "rule": "LayerMoE (arXiv 2505.22582): new experts in inverse proportion to the similarity of the FFN "
            "inputs between languages, Adams' apportionment; see docs/layer_allocation.md",
            "budget": self.budget,
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "spec": self.spec,
            "layers": [
                {
                    "layer": i,
                    "similarity": sim.values[i],
                    "new_old": sim.new_old[i],
                    "new_new": None if sim.new_new is None else sim.new_new[i],
                    "new_experts": n,
                }
                for i, n in enumerate(self.new_experts)
            ],
            "pairs": {f"{a}|{b}": values for (a, b), values in sim.pairs.items()},
            "corpora": self.corpora,
        }

    def table(self) -> str:
        """Markdown table: layer, similarity (and its two parts), new experts, experts."""
        sim = self.similarity
        lines = [
            "| layer | similarity | new-old | new-new | new experts | experts |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for i, n in enumerate(self.new_experts):
            new_new = "" if sim.new_new is None else f"{sim.new_new[i]:.4f}"
            experts = f"{n + 1}" if n else "1 (dense)"
            lines.append(f"| {i} | {sim.values[i]:.4f} | {sim.new_old[i]:.4f} | {new_new} | {n} | {experts} |")
        return "\n".join(lines)


def corpus_names(paths: Sequence[Path]) -> list[str]:
    """Short names for the report: file stems, or the full paths where stems collide."""
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def check_request(budget: int, new_corpora: Sequence[Path], old_corpora: Sequence[Path]) -> None:
    """The cheap checks, to run before any model is loaded."""
    _check_budget(budget)
    for option, paths in (("--new_corpus", new_corpora), ("--old_corpus", old_corpora)):
        if not paths:
            raise AllocationError(f"--num_experts auto:{budget} needs {option} (jsonl files, comma-separated).")
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise AllocationError(f"{option}: no such file {', '.join(missing)}.")
    shared = {Path(p).resolve() for p in new_corpora} & {Path(p).resolve() for p in old_corpora}
    if shared:
        raise AllocationError(f"{', '.join(map(str, sorted(shared)))} is given as both a new and an old corpus.")
    for option, paths in (("--new_corpus", new_corpora), ("--old_corpus", old_corpora)):
        if len({Path(p).resolve() for p in paths}) < len(paths):
            raise AllocationError(f"{option} names a file twice.")


@dataclass
class TokenizedCorpus:
    """The leading documents of one corpus, as token ids, ready to measure."""

    name: str
    role: str  # "new" or "old"
    path: Path
    documents: list[list[int]]
    max_length: int  # each document was cut to this many tokens

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.documents)


def read_corpora(
    tokenizer,
    new_corpora: Sequence[Path],
    old_corpora: Sequence[Path],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_length: int = DEFAULT_MAX_LENGTH,
    text_field: str = "text",
) -> list[TokenizedCorpus]:
    """Tokenise the first ``max_tokens`` tokens of every corpus: a malformed or empty corpus is refused
    here, before any forward pass."""
    if max_tokens < 1 or max_length < 1:
        raise AllocationError("max_tokens and max_length must be positive.")
    paths = [Path(p) for p in (*new_corpora, *old_corpora)]
    roles = ["new"] * len(new_corpora) + ["old"] * len(old_corpora)
    corpora = []
    for name, role, path in zip(corpus_names(paths), roles, paths):
        try:
            documents = first_token_ids(tokenizer, iter_jsonl_texts(path, text_field), max_tokens, max_length)
        except ValueError as error:  # a malformed line: say where, in one line
            raise AllocationError(str(error)) from None
        if not documents:
            raise AllocationError(f"{path} holds no text to measure.")
        corpora.append(TokenizedCorpus(name, role, path, documents, max_length))
    return corpora


def measure_similarity(
    model: torch.nn.Module, corpora: Sequence[TokenizedCorpus], batch_size: int = 8
) -> LayerSimilarity:
    """Per-layer similarity of ``model``'s FFN inputs between the new and the old corpora."""
    if batch_size < 1:
        raise AllocationError("batch_size must be positive.")
    directions: dict[str, dict[str, torch.Tensor]] = {"new": {}, "old": {}}
    for corpus in corpora:
        directions[corpus.role][corpus.name] = corpus_directions(
            model, corpus.documents, batch_size, desc=f"similarity: {corpus.name}"
        )
    return layer_similarity(directions["new"], directions["old"])


def allocate_measured(
    model: torch.nn.Module,
    corpora: Sequence[TokenizedCorpus],
    budget: int,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
) -> LayerAllocation:
    """Measure the similarity of ``model`` (a dense decoder) on tokenised corpora and spread ``budget`` new
    experts over ``layers`` (default: all)."""
    similarity = measure_similarity(model, corpora, batch_size)
    new_experts = allocate_new_experts(similarity.values, budget, layers)
    described = {
        c.name: {
            "role": c.role,
            "path": str(c.path),
            "tokens": c.tokens,
            "documents": len(c.documents),
            "max_length": c.max_length,
        }
        for c in corpora
    }
    return LayerAllocation(budget, similarity, new_experts, described)


def allocate(
    model: torch.nn.Module,
    tokenizer,
    budget: int,
    new_corpora: Sequence[Path],
    old_corpora: Sequence[Path],
    layers: Sequence[int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 8,
    text_field: str = "text",
) -> LayerAllocation:
    """``auto:K`` for a loaded dense model: check, tokenise the corpora, measure, allocate."""
    check_request(budget, new_corpora, old_corpora)
    corpora = read_corpora(tokenizer, new_corpora, old_corpora, max_tokens, max_length, text_field)
    return allocate_measured(model, corpora, budget, layers, batch_size)


def allocate_for_checkpoint(
    model_path: str | Path,
    budget: int,
    new_corpora: Sequence[Path],
    old_corpora: Sequence[Path],
    layers: Sequence[int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 8,
    text_field: str = "text",
    device: str = "cpu",
) -> LayerAllocation:
    """:func:`allocate` for the dense checkpoint at ``model_path``; the corpora are read before the model loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_model_dir(model_path)
    check_request(budget, new_corpora, old_corpora)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    corpora = read_corpora(tokenizer, new_corpora, old_corpora, max_tokens, max_length, text_field)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device).eval()
    return allocate_measured(model, corpora, budget, layers, batch_size)


def write_allocation(allocation: LayerAllocation, directory: str | Path) -> Path:
    """``layer_allocation.json`` in ``directory``: the similarities and counts, to reproduce or audit a run."""
    path = Path(directory) / ALLOCATION_FILE
    path.write_text(json.dumps(allocation.to_dict(), indent=2) + "\n")
    return path
