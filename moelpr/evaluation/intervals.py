"""Bootstrap intervals for held-out perplexity, resampling the evaluated blocks.

A perplexity over a few thousand tokens moves by several percent with the choice of text, so every figure of the
report carries a percentile-bootstrap interval: the held-out blocks (``cutoff_len`` tokens each) are drawn with
replacement and the token-weighted perplexity recomputed. A change between two models evaluated on the same
blocks (same tokenizer, same held-out text) is resampled *paired*, the same draw for both models, which is what
decides whether the difference is larger than the noise of the text sample; models tokenizing differently are
resampled independently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_SAMPLES = 2000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0


def _draws(num_blocks: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_blocks, size=(samples, num_blocks))


def _log_perplexities(nll: Sequence[float], tokens: Sequence[int], draws: np.ndarray) -> np.ndarray:
    nll_array, token_array = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    return nll_array[draws].sum(axis=1) / token_array[draws].sum(axis=1)


def _bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def perplexity_interval(
    nll: Sequence[float],
    tokens: Sequence[int],
    samples: int = DEFAULT_SAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """``level`` bootstrap interval of ``exp(sum nll / sum tokens)`` over the blocks."""
    log_ppl = _log_perplexities(nll, tokens, _draws(len(nll), samples, seed))
    low, high = _bounds(log_ppl, level)
    return float(np.exp(low)), float(np.exp(high))


def change_interval(
    base: tuple[Sequence[float], Sequence[int]],
    other: tuple[Sequence[float], Sequence[int]],
    paired: bool,
    samples: int = DEFAULT_SAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """``level`` bootstrap interval of the relative change ``ppl(other) / ppl(base) - 1``; ``(nll, tokens)`` per block.

    ``paired``: both were evaluated on the same blocks, so each draw takes the same blocks from both.
    """
    base_draws = _draws(len(base[0]), samples, seed)
    other_draws = base_draws if paired else _draws(len(other[0]), samples, seed + 1)
    log_ratio = _log_perplexities(*other, other_draws) - _log_perplexities(*base, base_draws)
    low, high = _bounds(log_ratio, level)
    return float(np.expm1(low)), float(np.expm1(high))


Blocks = tuple[Sequence[float], Sequence[int]]  # (nll, predicted tokens) per block


def mean_change_interval(
    pairs: Sequence[tuple[Blocks, Blocks]],
    samples: int = DEFAULT_SAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """Mean over languages of the relative change ``ppl(other) / ppl(base) - 1``, with its interval; one
    ``(base, other)`` pair of blocks per language, each evaluated on the same blocks (paired draws), languages
    drawn independently. Returns ``(mean, low, high)``."""
    changes = []
    for index, (base, other) in enumerate(pairs):
        draws = _draws(len(base[0]), samples, seed + index)
        drawn = np.expm1(_log_perplexities(*other, draws) - _log_perplexities(*base, draws))
        changes.append(np.append(drawn, np.expm1(_log_perplexity(*other) - _log_perplexity(*base))))  # point last
    stacked = np.mean(changes, axis=0)
    low, high = _bounds(stacked[:-1], level)
    return float(stacked[-1]), low, high


def gain_share_interval(
    base: Blocks,
    reference: Blocks,
    other: Blocks,
    samples: int = DEFAULT_SAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """Share of ``reference``'s log-perplexity gain over ``base`` that ``other`` achieves,
    ``(log ppl_base - log ppl_other) / (log ppl_base - log ppl_reference)``, with its interval; all three evaluated
    on the same blocks (one draw for all). Returns ``(share, low, high)``."""
    draws = _draws(len(base[0]), samples, seed)
    base_log = _log_perplexities(*base, draws)
    shares = (base_log - _log_perplexities(*other, draws)) / (base_log - _log_perplexities(*reference, draws))
    point = (_log_perplexity(*base) - _log_perplexity(*other)) / (_log_perplexity(*base) - _log_perplexity(*reference))
    low, high = _bounds(shares, level)
    return float(point), low, high


def _log_perplexity(nll: Sequence[float], tokens: Sequence[int]) -> float:
    return float(np.sum(nll) / np.sum(tokens))
