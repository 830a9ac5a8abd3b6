#!/usr/bin/env bash
# MoE-LPR stage 2 (review) with examples/moelpr/stage2.yaml, starting from stage 1's output.
# DATASET must include at least one dataset marked "language": "old" in data/dataset_info.json.
# Extra arguments are LLaMA-Factory overrides, e.g.:
#   bash scripts/stage2.sh max_samples=20000 deepspeed=examples/moelpr/ds_z2_config.json
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE1_DIR=${STAGE1_DIR:-saves/moelpr/stage1}
OUTPUT_DIR=${OUTPUT_DIR:-saves/moelpr/stage2}
DATASET=${DATASET:-old_en,new_hu,new_tr}

llamafactory-cli train examples/moelpr/stage2.yaml \
    model_name_or_path="$STAGE1_DIR" output_dir="$OUTPUT_DIR" dataset="$DATASET" "$@"
