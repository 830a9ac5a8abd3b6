#!/usr/bin/env bash
# The paper's comparison on the demo's base, corpora and token budget: dense full continual training, LoRA,
# LLaMA-Pro, MoE stage 1 only, MoE-LPR, review without LPR and MoE-CT, evaluated on 16k held-out tokens per
# language with bootstrap intervals; writes work/compare/comparison/comparison.md and tradeoff.png.
# See docs/comparison.md. It is the demo with --compare:
#
#   bash scripts/compare.sh            # outputs in work/compare/ (shares the demo's download cache)
#   bash scripts/compare.sh --quick    # tiny corpora, 2 steps per run (CI), outputs in work/compare-quick/
#   bash scripts/compare.sh --base gemma3-270m   # Gemma 3 270M; de, fr, es evaluated only (unseen original
#                                                # languages); outputs in work/compare-gemma3-270m/; resumable
#   bash scripts/compare.sh --seeds 3  # the headline rows trained with 3 seeds; the table shows their spread
exec bash "$(dirname "$0")/demo.sh" --compare "$@"
