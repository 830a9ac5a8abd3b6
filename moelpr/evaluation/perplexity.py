"""Token-weighted held-out perplexity and router statistics of one model on one language."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import EvaluationError

# ``max_tokens`` is spread over at least this many documents where a language has them, so one long page cannot
# fill a language's budget alone and leave its document-level interval nothing to resample.
SPREAD_DOCUMENTS = 20


def _least_cap(max_tokens: int, cutoff_len: int) -> int:
    return max(cutoff_len, math.ceil(max_tokens / SPREAD_DOCUMENTS))


def document_cap(lengths: Sequence[int], max_tokens: int, cutoff_len: int) -> int:
    """Tokens each document may contribute so that ``max_tokens`` is spread over the documents: at least
    ``max(cutoff_len, max_tokens / SPREAD_DOCUMENTS)`` (a document gives at least one block's worth), raised to the
    smallest cap whose documents still fill ``max_tokens`` where there are too few of them."""
    cap = _least_cap(max_tokens, cutoff_len)
    if sum(min(length, cap) for length in lengths) >= max_tokens:
        return cap
    # Water-filling: the documents shorter than the cap are kept whole and the rest share what is left equally.
    remaining, longer = max_tokens, sorted(lengths)
    for index, length in enumerate(longer):
        share = math.ceil(remaining / (len(longer) - index))
        if length >= share:
            return share
        remaining -= length
    return max(lengths, default=cap)


def packed_blocks(
    tokenizer, texts: Sequence[str], cutoff_len: int, max_tokens: int | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Held-out texts as LLaMA-Factory packs pre-training data: each text followed by the tokenizer's eos,
    all concatenated and cut into blocks of ``cutoff_len`` tokens, so perplexity is measured on inputs
    shaped like the training inputs. The last, shorter block is kept (LLaMA-Factory drops it) so that small
    held-out sets lose nothing.

    ``max_tokens`` keeps that many tokens spread over the texts: each text contributes its first
    :func:`document_cap` tokens (a cut text still ends with eos, one predicted token per cut text that the text
    did not have), texts taken in order until the budget is met.

    Also returns, per block, the index in ``texts`` of each token's text: a block cuts across texts, and the
    bootstrap resamples texts (documents), so each predicted token's loss is credited to its own text.
    """
    if cutoff_len < 2:
        raise ValueError("cutoff_len must be at least 2 (one token to condition on, one to predict)")
    eos = tokenizer.eos_token or ""
    cap = None if max_tokens is None else _least_cap(max_tokens, cutoff_len)
    tokenized: list[list[int]] = []
    capped_total = 0
    for text in texts:
        tokenized.append(tokenizer(text + eos, add_special_tokens=False)["input_ids"])
        if cap is not None:
            capped_total += min(len(tokenized[-1]), cap)
            if capped_total >= max_tokens:
                break
    else:
        if max_tokens is not None:
            cap = document_cap([len(ids) for ids in tokenized], max_tokens, cutoff_len)
    stream: list[int] = []
    owners: list[int] = []
    for index, ids in enumerate(tokenized):
        if cap is not None and len(ids) > cap:
            ids = ids[: cap - 1] + ids[-1:] if eos else ids[:cap]
        stream.extend(ids)
        owners.extend([index] * len(ids))
    if max_tokens is not None:
        del stream[max_tokens:], owners[max_tokens:]
    blocks = [stream[i : i + cutoff_len] for i in range(0, len(stream), cutoff_len)]
    documents = [owners[i : i + cutoff_len] for i in range(0, len(owners), cutoff_len)]
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        for block in blocks:
            block[0] = tokenizer.bos_token_id  # what LLaMA-Factory does to packed blocks
    kept = [index for index, block in enumerate(blocks) if len(block) >= 2]
    return [blocks[index] for index in kept], [documents[index] for index in kept]


def token_blocks(tokenizer, texts: Sequence[str], cutoff_len: int, max_tokens: int | None = None) -> list[list[int]]:
    """The blocks of :func:`packed_blocks` alone."""
    return packed_blocks(tokenizer, texts, cutoff_len, max_tokens)[0]


@dataclass
class RoutingTotals:
    """Sums over the tokens of one language, per MoE layer, from which the report's means come."""

    tokens: int = 0
    top1_counts: list[torch.Tensor] = field(default_factory=list)  # per layer: [num_experts]
    prob_sums: list[torch.Tensor] = field(default_factory=list)  # per layer: [num_experts]
    ffn_weight_sums: list[torch.Tensor] = field(default_factory=list)  # per layer (MoE-CT): fusion weight on the frozen FFN

    def add(self, router_logits: Sequence[torch.Tensor], ffn_fusion_weights: Sequence[torch.Tensor] | None = None) -> None:
        for layer, logits in enumerate(router_logits):
            logits = logits.detach().float()
            counts = torch.bincount(logits.argmax(dim=-1), minlength=logits.shape[-1]).double()
            probs = logits.softmax(dim=-1).sum(dim=0).double()
            if layer == len(self.top1_counts):
                self.top1_counts.append(torch.zeros_like(counts))
                self.prob_sums.append(torch.zeros_like(probs))
            self.top1_counts[layer] += counts
            self.prob_sums[layer] += probs
        for layer, weights in enumerate(ffn_fusion_weights or ()):
            weight_sum = weights.detach().double().sum()  # a device tensor: no host read per layer
            if layer == len(self.ffn_weight_sums):
                self.ffn_weight_sums.append(torch.zeros_like(weight_sum))
            self.ffn_weight_sums[layer] += weight_sum
        self.tokens += int(router_logits[0].shape[0]) if router_logits else 0

    def expert0_top1_share(self) -> list[float]:
        """Per layer: share of tokens whose highest-scoring expert is expert 0 (the original FFN)."""
        return [float(c[0] / self.tokens) for c in self.top1_counts]

    def top1_share(self) -> list[list[float]]:
        """Per layer, per expert: share of tokens whose highest-scoring expert it is."""
        return [(c / self.tokens).tolist() for c in self.top1_counts]

    def mean_router_prob(self) -> list[list[float]]:
        """Per layer, per expert: router softmax probability averaged over tokens."""
        return [(p / self.tokens).tolist() for p in self.prob_sums]

    def ffn_fusion_weight(self) -> list[float]:
        """Per layer (MoE-CT): the fusion weight on the frozen FFN averaged over tokens."""
        return [float(w) / self.tokens for w in self.ffn_weight_sums]


@dataclass
class LanguageResult:
    """Negative log-likelihood per held-out block and per document (the unit the intervals resample), and the
    routing totals."""

    block_nll: list[float]
    block_tokens: list[int]  # predicted tokens per block
    routing: RoutingTotals | None
    blocks_digest: str = ""  # identifies the token blocks, so models compared on the same blocks pair up
    document_nll: list[float] = field(default_factory=list)  # per document with a predicted token, in text order
    document_tokens: list[int] = field(default_factory=list)
    document_indices: list[int] = field(default_factory=list)  # their indices in the evaluated texts

    @property
    def nll_sum(self) -> float:
        return math.fsum(self.block_nll)

    @property
    def predicted_tokens(self) -> int:
        return sum(self.block_tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.predicted_tokens)


def blocks_digest(blocks: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(block) for block in blocks]).encode()).hexdigest()[:16]


@torch.inference_mode()
def evaluate_language(
    model: torch.nn.Module,
    blocks: Sequence[Sequence[int]],
    batch_size: int,
    is_moe: bool,
    desc: str = "",
    token_documents: Sequence[Sequence[int]] | None = None,
) -> LanguageResult:
    """Next-token negative log-likelihood of each of ``blocks`` (and router totals for MoE models); with
    ``token_documents`` (:func:`packed_blocks`), also per document, each predicted token counted in its own.

    Blocks of equal length are batched without padding; only the last block of a language can be
    shorter, and it runs alone.
    """
    if not blocks:
        raise EvaluationError("no held-out tokens to evaluate")
    device = next(model.parameters()).device
    batches: list[list[Sequence[int]]] = []
    for block in blocks:
        if batches and len(batches[-1]) < batch_size and len(batches[-1][0]) == len(block):
            batches[-1].append(block)
        else:
            batches.append([block])

    block_nll: list[float] = []
    block_tokens: list[int] = []
    document_totals: dict[int, list[float]] = {}  # document index -> [nll, predicted tokens]
    done = 0
    routing = RoutingTotals() if is_moe else None
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        input_ids = torch.tensor(batch, dtype=torch.long, device=device)
        extra = {"output_router_logits": True} if is_moe else {}
        outputs = model(input_ids=input_ids, **extra)
        logits = outputs.logits[:, :-1].float()
        targets = input_ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        block_nll += nll.reshape(targets.shape).double().sum(dim=1).tolist()
        block_tokens += [targets.shape[1]] * targets.shape[0]
        if token_documents is not None:
            for row, token_nll in enumerate(nll.reshape(targets.shape).double().tolist()):
                for owner, value in zip(token_documents[done + row][1:], token_nll):
                    totals = document_totals.setdefault(owner, [0.0, 0])
                    totals[0] += value
                    totals[1] += 1
        done += len(batch)
        if routing is not None:
            routing.add(outputs.router_logits, outputs.ffn_fusion_weights)
    indices = sorted(document_totals)
    return LanguageResult(
        block_nll, block_tokens, routing, blocks_digest(blocks), [document_totals[i][0] for i in indices],
        [int(document_totals[i][1]) for i in indices], indices,
    )
