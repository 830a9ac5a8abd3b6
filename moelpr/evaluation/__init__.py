"""Evaluation of dense and MoE-LPR models: per-language held-out perplexity, routing report, loss curves.

``moelpr eval --help`` describes the command; :func:`evaluate` is the library entry point.
"""

from .perplexity import LanguageResult, RoutingTotals, evaluate_language, token_blocks
from .report import evaluate

__all__ = ["LanguageResult", "RoutingTotals", "evaluate", "evaluate_language", "token_blocks"]
