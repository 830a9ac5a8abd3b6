"""Bootstrap intervals for held-out perplexity, resampling the evaluated documents.

A perplexity over a few thousand tokens moves by several percent with the choice of text, so every figure of the
report carries a percentile-bootstrap interval: the held-out documents (help pages) are drawn with replacement and
the token-weighted perplexity recomputed. The unit is the document, not the fixed token block the model reads:
blocks of one page are alike (one topic, one vocabulary), so resampling blocks would count a page of ten blocks as
ten independent observations and give intervals narrower than the text allows.

Every sample is ``(nll, tokens, ids)`` per document. Models evaluated on the same documents are resampled *paired*
(the same draw for all), which is what decides whether a difference is larger than the noise of the text; the
functions that compare models refuse samples over different documents instead of pairing them wrongly. A mean over
languages resamples documents *jointly*: one draw over all document ids, a page drawn in every language that holds
it, since the held-out help pages are translations of one another and their difficulty moves together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import EvaluationError

DEFAULT_SAMPLES = 2000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0

# (nll, predicted tokens) per document, and optionally the documents' ids (needed to check pairing and to resample
# languages jointly; without them, units are told apart by position only).
Units = tuple[Sequence[float], Sequence[int]] | tuple[Sequence[float], Sequence[int], Sequence[str]]


class MismatchedDocuments(EvaluationError):
    """Two models' samples compared as paired cover different documents."""


def _ids(units: Units) -> list[str]:
    return [str(i) for i in units[2]] if len(units) > 2 else [str(i) for i in range(len(units[0]))]


def bootstrap_counts(num_units: int, samples: int, seed: int) -> np.ndarray:
    """How often each unit is drawn in each bootstrap sample: ``[samples, num_units]``."""
    draws = np.random.default_rng(seed).integers(0, num_units, size=(samples, num_units))
    counts = np.zeros((samples, num_units))
    np.add.at(counts, (np.arange(samples)[:, None], draws), 1)
    return counts


def _log_perplexities(units: Units, counts: np.ndarray) -> np.ndarray:
    nll, tokens = np.asarray(units[0], dtype=np.float64), np.asarray(units[1], dtype=np.float64)
    return (counts @ nll) / (counts @ tokens)


def _log_perplexity(units: Units) -> float:
    return float(np.sum(units[0]) / np.sum(units[1]))


def percentile_bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap draws."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def require_same_ids(first: Sequence, other: Sequence, mismatch: str, remedy: str) -> None:
    """One-line refusal (``"<mismatch> (counts): <remedy>"``) when two samples meant to be paired are over different
    units (documents, benchmark items), compared in order."""
    first, other = [str(i) for i in first], [str(i) for i in other]
    if first != other:
        raise MismatchedDocuments(
            f"{mismatch} ({len(first)} vs {len(other)}, {len(set(first) ^ set(other))} not in both): {remedy}"
        )


def require_same_documents(*samples: Units, what: str = "models") -> None:
    """One-line refusal when samples meant to be paired were evaluated on different documents."""
    first = _ids(samples[0])
    for other in samples[1:]:
        require_same_ids(
            first, _ids(other), f"the {what} were evaluated on different documents",
            "evaluate them on the same held-out texts and tokenizer",
        )


def perplexity_interval(
    nll: Sequence[float],
    tokens: Sequence[int],
    samples: int = DEFAULT_SAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """``level`` bootstrap interval of ``exp(sum nll / sum tokens)`` over the units (documents)."""
    log_ppl = _log_perplexities((nll, tokens), bootstrap_counts(len(nll), samples, seed))
    low, high = percentile_bounds(log_ppl, level)
    return float(np.exp(low)), float(np.exp(high))


def change_interval(
    base: Units,
    other: Units,
    paired: bool,
    samples: int = DEFAULT_SAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """``level`` bootstrap interval of the relative change ``ppl(other) / ppl(base) - 1``.

    ``paired``: both were evaluated on the same documents (checked), so each draw takes the same documents from
    both; otherwise each is resampled on its own.
    """
    if paired:
        require_same_documents(base, other)
    base_counts = bootstrap_counts(len(base[0]), samples, seed)
    other_counts = base_counts if paired else bootstrap_counts(len(other[0]), samples, seed + 1)
    log_ratio = _log_perplexities(other, other_counts) - _log_perplexities(base, base_counts)
    low, high = percentile_bounds(log_ratio, level)
    return float(np.expm1(low)), float(np.expm1(high))


def joint_counts(per_language: Sequence[Units], samples: int, seed: int) -> list[np.ndarray]:
    """One bootstrap draw over the union of the languages' document ids, as counts per language's documents: a page
    held out in several languages (the same page translated) is drawn, or not, in all of them at once."""
    ids = [_ids(units) for units in per_language]
    union = sorted(set().union(*ids))
    column = {doc_id: index for index, doc_id in enumerate(union)}
    counts = bootstrap_counts(len(union), samples, seed)
    return [counts[:, [column[doc_id] for doc_id in language_ids]] for language_ids in ids]


def mean_change_interval(
    pairs: Sequence[tuple[Units, Units]],
    samples: int = DEFAULT_SAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """Mean over languages of the relative change ``ppl(other) / ppl(base) - 1``, with its interval; one
    ``(base, other)`` pair per language, both on the same documents (checked), documents drawn jointly across
    languages by id. A draw that holds none of a language's documents (its pages are not the others', as general
    English's are not the help pages) averages over the languages it holds. Returns ``(mean, low, high)``."""
    for index, (base, other) in enumerate(pairs):
        require_same_documents(base, other, what=f"models of language #{index + 1}")
    counts = joint_counts([base for base, _ in pairs], samples, seed)
    with np.errstate(invalid="ignore"):  # 0/0 where a draw holds none of a language's documents
        drawn = np.stack([np.expm1(_log_perplexities(other, c) - _log_perplexities(base, c))
                          for (base, other), c in zip(pairs, counts)])
    point = np.mean([np.expm1(_log_perplexity(other) - _log_perplexity(base)) for base, other in pairs])
    # Every draw holds some language's documents (each id drawn belongs to one), so no column is all NaN.
    low, high = percentile_bounds(np.nanmean(drawn, axis=0), level)
    return float(point), low, high


def gain_share_interval(
    base: Units,
    reference: Units,
    other: Units,
    samples: int = DEFAULT_SAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """Share of ``reference``'s log-perplexity gain over ``base`` that ``other`` achieves,
    ``(log ppl_base - log ppl_other) / (log ppl_base - log ppl_reference)``, with its interval; all three on the
    same documents (checked; one draw for all). Returns ``(share, low, high)``."""
    require_same_documents(base, reference, other)
    counts = bootstrap_counts(len(base[0]), samples, seed)
    base_log = _log_perplexities(base, counts)
    shares = (base_log - _log_perplexities(other, counts)) / (base_log - _log_perplexities(reference, counts))
    point = (_log_perplexity(base) - _log_perplexity(other)) / (_log_perplexity(base) - _log_perplexity(reference))
    low, high = percentile_bounds(shares, level)
    return float(point), low, high


def document_units(cell: Mapping) -> tuple[list[float], list[int], list[str]]:
    """``(nll, tokens, ids)`` per document of a report cell, the unit the intervals resample."""
    if "document_nll" not in cell:
        raise ValueError("the report has no per-document losses (written before intervals resampled documents): "
                         "re-run moelpr eval")
    return cell["document_nll"], cell["document_tokens"], cell["document_ids"]
