#!/usr/bin/env bash
# Everything GPU-bound this project measures, in one go on one GPU (sized for at most 8 minutes), results and logs
# under $OUT:
#   1. bf16 training step time, tokens/s and peak step memory of MoE-LPR stage 1 and stage 2 (experts run as a loop
#      and grouped) against dense full fine-tuning, on a random model of Qwen2.5-0.5B's shape (step_time.json),
#      and the check that no MoE block synchronises host and GPU in its training forward/backward (sync_check.json);
#   2. prefill and decode speed of the MoE model against the dense one (inference_{auto,loop}.json);
#   3. both stages through `llamafactory-cli train` under DeepSpeed ZeRO-2 and ZeRO-3 on the one GPU in bf16, and
#      the freeze rules checked bit for bit against the bf16 upcycled checkpoint (freeze_zero{2,3}.json).
# summary.txt lists each part with its status and wall time; logs/ holds each command's output.
#
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh --cpu-tiny   # the same parts on tiny models on the CPU (CI)
#   OUT=/path/to/results bash benchmarks/gpu_suite.sh --parts train   # some parts again (of step_time, sync_check,
#                                                                     # inference, train)
#
# --cpu-tiny runs every script of the suite on a 2-layer model with a few steps, so the suite cannot rot; its
# LLaMA-Factory runs go without DeepSpeed (tests/test_plugin_deepspeed.py trains under ZeRO-2/3 on the CPU), its
# sync check reports that it needs a GPU, and the inference benchmark runs with the default implementation only.
# Exit status: 0 when every part succeeded.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu_suite_out}
MODE=gpu
PARTS=step_time,sync_check,inference,train
while [[ $# -gt 0 ]]; do
    case $1 in
        --cpu-tiny) MODE=cpu-tiny ;;
        --parts) PARTS=${2:-}; shift ;;
        *) echo "usage: OUT=DIR bash benchmarks/gpu_suite.sh [--cpu-tiny] [--parts $PARTS]" >&2; exit 2 ;;
    esac
    shift
done
# wants PART: whether --parts names PART (the models are always made: every part uses them).
wants() { [[ ",$PARTS," == *",$1,"* ]]; }
for part in ${PARTS//,/ }; do
    [[ $part =~ ^(step_time|sync_check|inference|train)$ ]] || { echo "unknown part '$part' in --parts" >&2; exit 2; }
done
mkdir -p "$OUT/logs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moelpr-gpu-suite.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
: > "$OUT/summary.txt"
FAILED=0

if [[ $MODE == gpu ]]; then
    SHAPE=qwen2.5-0.5b DTYPE_FLAG=--bf16 DEVICE=cuda
    STEP_ARGS=(--dtypes bf16 --batch 8 --seq 1024 --repeats 4)
    INFER_ARGS=(--bf16 --batch 8 --seq 1024 --new_tokens 64 --repeats 5)
    TRAIN_COMMON=(bf16: true cutoff_len: 512 per_device_train_batch_size: 4 max_steps: 3)
    STAGES_UNDER=(zero2 zero3)
    IMPLEMENTATIONS=(auto loop)
    SLOWER=1
    if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "no CUDA device visible; run with --cpu-tiny for the CPU form" >&2
        exit 2
    fi
    nvidia-smi > "$OUT/logs/nvidia-smi.log" 2>&1
else
    SHAPE=tiny DTYPE_FLAG= DEVICE=cpu
    STEP_ARGS=(--dtypes bf16,float32 --batch 2 --seq 16 --repeats 1)
    INFER_ARGS=(--batch 1 --seq 16 --prompt 4 --new_tokens 2 --repeats 1)
    TRAIN_COMMON=(use_cpu: true cutoff_len: 32 per_device_train_batch_size: 2 max_steps: 1)
    STAGES_UNDER=(plain)
    IMPLEMENTATIONS=(auto)
    SLOWER=6  # time limits are the GPU's; a shared 2-core CI machine is slower at the imports and model writing
fi

# run_part NAME TIMEOUT_SECONDS COMMAND...: runs COMMAND, output to logs/NAME.log, a line in summary.txt.
run_part() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$((limit * SLOWER))" "$@" > "$OUT/logs/$name.log" 2>&1
    local status=$?
    local verdict=ok
    if [[ $status -ne 0 ]]; then
        verdict="FAILED (exit $status$([[ $status -eq 124 ]] && echo ', timed out'))"
        FAILED=1
    fi
    echo "$name: $verdict in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

# write_recipe FILE KEY: VALUE ...: a LLaMA-Factory YAML recipe (values as YAML scalars).
write_recipe() {
    local file=$1
    shift
    : > "$file"
    while [[ $# -gt 0 ]]; do
        echo "$1 $2" >> "$file"
        shift 2
    done
}

# write_recipes UNDER: the stage-1 and stage-2 recipes of one run under $WORK/train-UNDER.
write_recipes() {
    local under=$1 dir="$WORK/train-$1" ds=()
    mkdir -p "$dir"
    [[ $under == zero2 ]] && ds=(deepspeed: "$REPO/examples/moelpr/ds_z2_config.json")
    [[ $under == zero3 ]] && ds=(deepspeed: "$REPO/examples/moelpr/ds_z3_config.json")
    local common=(stage: pt do_train: true finetuning_type: moelpr dataset_dir: "$REPO/data" logging_steps: 1
        save_steps: 1000 report_to: none seed: 7 gradient_accumulation_steps: 1 "${TRAIN_COMMON[@]}" "${ds[@]}")
    write_recipe "$dir/stage1.yaml" "${common[@]}" model_name_or_path: "$WORK/models/moe" output_dir: "$dir/stage1" \
        moelpr_stage: post_pretrain dataset: new_hu,new_tr learning_rate: 1.0e-3
    write_recipe "$dir/stage2.yaml" "${common[@]}" model_name_or_path: "$dir/stage1" output_dir: "$dir/stage2" \
        moelpr_stage: review generate_lang_mask: true dataset: new_hu,old_en mix_strategy: interleave_under \
        interleave_probs: 0.5,0.5 learning_rate: 2.0e-2
}

export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$REPO
echo "mode: $MODE, shape: $SHAPE, started $(date -u +%FT%TZ)" | tee -a "$OUT/summary.txt"
run_part models 240 python "$REPO/benchmarks/random_models.py" --shape "$SHAPE" --output_dir "$WORK/models" \
    --num_experts 4 --topk 2 $DTYPE_FLAG
DENSE=$WORK/models/dense MOE=$WORK/models/moe
wants step_time && run_part step_time 200 python "$REPO/benchmarks/step_time.py" --dense "$DENSE" --moe "$MOE" \
    --device "$DEVICE" "${STEP_ARGS[@]}" --json "$OUT/step_time.json"
wants sync_check && run_part sync_check 90 python "$REPO/benchmarks/sync_check.py" --moe "$MOE" \
    --json "$OUT/sync_check.json"
wants inference || IMPLEMENTATIONS=()
for implementation in "${IMPLEMENTATIONS[@]}"; do
    run_part "inference_$implementation" 120 python "$REPO/benchmarks/inference_speed.py" --dense "$DENSE" \
        --moe "$MOE" --device "$DEVICE" --implementation "$implementation" "${INFER_ARGS[@]}" \
        --json "$OUT/inference_$implementation.json"
done
# The LLaMA-Factory runs last: they depend on the most packages, so a stack problem there costs no measurement.
wants train || STAGES_UNDER=()
for under in "${STAGES_UNDER[@]}"; do
    write_recipes "$under"
    # Under DeepSpeed one process per GPU, launched as torchrun launches several (DeepSpeed wants its setup).
    launch=""
    [[ $under == zero* ]] && launch="export FORCE_TORCHRUN=1 NPROC_PER_NODE=1 &&"
    run_part "train_$under" 300 bash -c "cd '$WORK/train-$under' && $launch llamafactory-cli train stage1.yaml &&
        llamafactory-cli train stage2.yaml"
    run_part "freeze_$under" 120 python "$REPO/benchmarks/check_freeze.py" --upcycled "$MOE" \
        --stage1 "$WORK/train-$under/stage1" --stage2 "$WORK/train-$under/stage2" --json "$OUT/freeze_$under.json"
done
echo "finished $(date -u +%FT%TZ), $SECONDS s in all" | tee -a "$OUT/summary.txt"
exit $FAILED
