#!/usr/bin/env bash
# MoE-LPR stage 1 (post-pretraining) with examples/moelpr/stage1.yaml.
# Upcycles BASE_MODEL (a local dense checkpoint) into UPCYCLED first if that directory holds no model yet.
# Extra arguments are LLaMA-Factory overrides, e.g.:
#   BASE_MODEL=path/to/dense bash scripts/stage1.sh deepspeed=examples/moelpr/ds_z2_config.json
# With more than one GPU, llamafactory-cli launches torchrun itself (FORCE_TORCHRUN=1 NPROC_PER_NODE=N on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

UPCYCLED=${UPCYCLED:-saves/moelpr/upcycled}
OUTPUT_DIR=${OUTPUT_DIR:-saves/moelpr/stage1}
DATASET=${DATASET:-new_hu,new_tr}
NUM_EXPERTS=${NUM_EXPERTS:-4}
TOPK=${TOPK:-2}

if [ ! -f "$UPCYCLED/config.json" ]; then
    : "${BASE_MODEL:?set BASE_MODEL to the dense model directory to upcycle (or UPCYCLED to an upcycled one)}"
    moelpr upcycle --model_path "$BASE_MODEL" --output_path "$UPCYCLED" --num_experts "$NUM_EXPERTS" --topk "$TOPK"
fi

llamafactory-cli train examples/moelpr/stage1.yaml \
    model_name_or_path="$UPCYCLED" output_dir="$OUTPUT_DIR" dataset="$DATASET" "$@"
