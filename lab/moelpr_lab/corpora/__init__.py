"""Corpora for the MoE-LPR demo, built from Debian packages.

New languages come from LibreOffice's help (the same ~2,500 pages in every language), the old
language from its English original, and general English for measuring forgetting from ``fortunes``.
Run ``python -m moelpr_lab.corpora --help``.
"""

from .build import (
    UNSEEN,
    CorpusOptions,
    CorpusSpec,
    build_corpora,
    dataset_entries,
    general_english_corpus,
    help_corpus,
    is_heldout,
)
from .debian import CorpusError

__all__ = [
    "UNSEEN",
    "CorpusError",
    "CorpusOptions",
    "CorpusSpec",
    "build_corpora",
    "dataset_entries",
    "general_english_corpus",
    "help_corpus",
    "is_heldout",
]
