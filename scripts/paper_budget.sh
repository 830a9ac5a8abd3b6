#!/usr/bin/env bash
# The paper's budgets on the demo's base (SmolLM2-135M-Instruct, the demo's corpora and recipes). Long: hours on a
# 2-core CPU. Every training run checkpoints and resumes where it stopped, every finished step is skipped, so run it
# in the background and start it again after it was stopped (see docs/comparison.md, "The paper's multilingual claims"):
#
#   nohup bash scripts/paper_budget.sh --review-budget > work/review-budget.log 2>&1 &
#   nohup bash scripts/paper_budget.sh --layermoe > work/layermoe.log 2>&1 &
#
#   --review-budget  stage 1 of 600 steps (10x the demo's 61,440 tokens: 614,400), then a review of 30 steps (5% of
#                    stage 1's tokens) in the paper's LPR form and in the authors', and of 200 steps (33%, the demo's
#                    ratio) in the paper's form; dense full training of 600 steps as the reference. work/review-budget/
#   --layermoe       LayerMoE (arXiv 2505.22582) against uniform MoE-LPR on the demo's data and steps (60 + 20):
#                    uniform 4 experts (90 new experts), auto:90 (the same number, placed by similarity) and auto:45
#                    (half). work/layermoe/
#   --quick          the same pipeline on tiny corpora with a few steps, checkpointing every 2 (CI-sized smoke run)
#
# Environment: MOELPR_BUDGET_DIR (outputs), MOELPR_CACHE_DIR (downloads, shared with the demo), MOELPR_DEMO_BF16,
# MOELPR_SAVE_STEPS (checkpoint interval; default 25).
set -euo pipefail
cd "$(dirname "$0")/.."
# The lab (demo corpora, GGUF base models, the comparison) lives in lab/, outside the installed package.
export PYTHONPATH="$PWD/lab${PYTHONPATH:+:$PYTHONPATH}"

MODE=
QUICK=0
for arg in "$@"; do
    case "$arg" in
        --review-budget) MODE=review-budget ;;
        --layermoe) MODE=layermoe ;;
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "paper_budget.sh: unknown option $arg (use --review-budget, --layermoe, --quick or --help)" >&2; exit 2 ;;
    esac
done
[ -n "$MODE" ] || { echo "paper_budget.sh: choose --review-budget or --layermoe (see --help)" >&2; exit 2; }

CACHE=${MOELPR_CACHE_DIR:-work/cache}
BASE_MODEL=$CACHE/models/smollm2-135m-instruct
if [ "$QUICK" = 1 ]; then
    WORK=${MOELPR_BUDGET_DIR:-work/$MODE-quick}
    CORPUS_ARGS=(--max_documents 120 --max_train_chars 60000)
    STAGE1_STEPS=4; LONG_STAGE1_STEPS=8; REVIEW_STEPS=2; SHORT_REVIEW_STEPS=1; LONG_REVIEW_STEPS=3
    MAX_SAMPLES=40; REPLAY_SAMPLES=10; LOGGING_STEPS=1; EVAL_TOKENS=512; SAVE_STEPS=${MOELPR_SAVE_STEPS:-2}
    ALLOCATION_TOKENS=2000
else
    WORK=${MOELPR_BUDGET_DIR:-work/$MODE}
    CORPUS_ARGS=()
    # The demo's 60 + 20 steps; the long stage 1 is 10x, its reviews 5% and 33% of its tokens (same block size).
    STAGE1_STEPS=60; LONG_STAGE1_STEPS=600; REVIEW_STEPS=20; SHORT_REVIEW_STEPS=30; LONG_REVIEW_STEPS=200
    MAX_SAMPLES=1000; REPLAY_SAMPLES=100; LOGGING_STEPS=5; EVAL_TOKENS=16384; SAVE_STEPS=${MOELPR_SAVE_STEPS:-25}
    ALLOCATION_TOKENS=20000
fi
CORPORA=$WORK/corpora
SAVES=$WORK/saves
MODELS_DIR=$WORK/models
EVAL=$WORK/eval
LOGS=$WORK/logs
NEW_TRAIN=hu_train,tr_train,el_train
REPLAY=en_train,en_general_train,$NEW_TRAIN
if [ -z "${MOELPR_DEMO_BF16:-}" ]; then
    if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then MOELPR_DEMO_BF16=true; else MOELPR_DEMO_BF16=false; fi
fi
EVAL_DTYPE=()
[ "$MOELPR_DEMO_BF16" = true ] && EVAL_DTYPE=(--bf16)
STAGE1=examples/moelpr/demo/demo_stage1.yaml
STAGE2=examples/moelpr/demo/demo_stage2.yaml
FULL_FT=examples/moelpr/demo/demo_full_ft.yaml

START=$SECONDS
say() { printf '\n[budget %dm%02ds] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }
mkdir -p "$LOGS" "$MODELS_DIR"
source scripts/train_run.sh
echo "[budget] $MODE: outputs in $WORK, bf16=$MOELPR_DEMO_BF16, quick=$QUICK, checkpoint every $SAVE_STEPS steps"

say "Base model and corpora (the demo's)"
python -m moelpr_lab.gguf.convert --model smollm2 --output_dir "$BASE_MODEL"
python -m moelpr_lab.corpora --output_dir "$CORPORA" --cache_dir "$CACHE/debian" --new hu,tr,el --old en "${CORPUS_ARGS[@]}"

# upcycle NAME ARGS...: one `moelpr upcycle` (the authors' router initialisation, the default), skipped when done.
upcycle() {
    local out=$MODELS_DIR/$1
    if [ -f "$out/config.json" ]; then echo "[budget] $out exists, skipping"; return; fi
    moelpr upcycle --model_path "$BASE_MODEL" --output_path "$out" "${@:2}"
}

# Methods of the comparison table: name in the evaluation, label, training runs.
METHODS=()
MODELS=(base="$BASE_MODEL")
if [ "$MODE" = review-budget ]; then
    upcycle upcycled --num_experts 4 --topk 2
    say "Stage 1: $LONG_STAGE1_STEPS steps on hu/tr/el (10x the demo)"
    train stage1 "$STAGE1" "$MODELS_DIR/upcycled" "$NEW_TRAIN" 100000 "$LONG_STAGE1_STEPS"
    say "Review, $SHORT_REVIEW_STEPS steps (5% of stage 1's tokens), paper's LPR form"
    train review5_paper "$STAGE2" "$SAVES/stage1" "$REPLAY" "$REPLAY_SAMPLES" "$SHORT_REVIEW_STEPS" lpr_loss_form=paper
    say "Review, $SHORT_REVIEW_STEPS steps (5%), the authors' LPR form"
    train review5_authors "$STAGE2" "$SAVES/stage1" "$REPLAY" "$REPLAY_SAMPLES" "$SHORT_REVIEW_STEPS" lpr_loss_form=authors
    say "Review, $LONG_REVIEW_STEPS steps (33%, the demo's ratio), paper's LPR form"
    train review33_paper "$STAGE2" "$SAVES/stage1" "$REPLAY" "$((REPLAY_SAMPLES * 10))" "$LONG_REVIEW_STEPS" lpr_loss_form=paper
    say "Reference: dense full training, $LONG_STAGE1_STEPS steps"
    train full_ft "$FULL_FT" "$BASE_MODEL" "$NEW_TRAIN" 100000 "$LONG_STAGE1_STEPS"
    MODELS+=(full_ft="$SAVES/full_ft" stage1="$SAVES/stage1" review5_paper="$SAVES/review5_paper"
             review5_authors="$SAVES/review5_authors" review33_paper="$SAVES/review33_paper")
    METHODS=("full_ft|Full continual training|full_ft" "stage1|MoE stage 1 only|stage1"
             "review5_paper|MoE-LPR, review 5%, paper's LPR|stage1,review5_paper"
             "review5_authors|MoE-LPR, review 5%, authors' LPR|stage1,review5_authors"
             "review33_paper|MoE-LPR, review 33%, paper's LPR|stage1,review33_paper")
else
    corpus_files() { local IFS=,; echo "$*"; }
    NEW_FILES=$(corpus_files "$CORPORA/hu_train.jsonl" "$CORPORA/tr_train.jsonl" "$CORPORA/el_train.jsonl")
    OLD_FILES=$(corpus_files "$CORPORA/en_train.jsonl" "$CORPORA/en_general_train.jsonl")
    say "Upcycle: uniform 4 experts (90 new), LayerMoE auto:90 and auto:45, top-2"
    upcycle uniform4 --num_experts 4 --topk 2
    for budget in 90 45; do
        upcycle "auto$budget" --num_experts "auto:$budget" --topk 2 --new_corpus "$NEW_FILES" --old_corpus "$OLD_FILES" \
            --allocation_max_tokens "$ALLOCATION_TOKENS"
    done
    for arm in uniform4 auto90 auto45; do
        say "$arm: stage 1 ($STAGE1_STEPS steps), review ($REVIEW_STEPS steps, paper's LPR)"
        train "${arm}_stage1" "$STAGE1" "$MODELS_DIR/$arm" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS"
        train "${arm}_stage2" "$STAGE2" "$SAVES/${arm}_stage1" "$REPLAY" "$REPLAY_SAMPLES" "$REVIEW_STEPS"
        MODELS+=("$arm=$SAVES/${arm}_stage2")
    done
    say "Reference: dense full training, $STAGE1_STEPS steps"
    train full_ft "$FULL_FT" "$BASE_MODEL" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS"
    MODELS+=(full_ft="$SAVES/full_ft")
    METHODS=("full_ft|Full continual training|full_ft"
             "uniform4|MoE-LPR, uniform 4 experts (90 new)|uniform4_stage1,uniform4_stage2"
             "auto90|LayerMoE auto:90|auto90_stage1,auto90_stage2"
             "auto45|LayerMoE auto:45|auto45_stage1,auto45_stage2")
fi

say "Evaluation: held-out perplexity per language ($EVAL_TOKENS tokens each)"
if eval_stale "$EVAL" "$SAVES"/*/; then
    args=()
    for model in "${MODELS[@]}"; do args+=(--model "$model"); done
    for lang in hu tr el en en_general; do args+=(--heldout "$lang=$CORPORA/${lang}_heldout.jsonl"); done
    moelpr eval "${args[@]}" --old_languages en,en_general --max_tokens "$EVAL_TOKENS" --cutoff_len 256 \
        "${EVAL_DTYPE[@]}" --output_dir "$EVAL" 2>&1 | tee "$LOGS/eval.log"
fi

say "Comparison table"
python - "$SAVES" "$LOGS" "$WORK/methods.json" "${METHODS[@]}" <<'PY'
import json, sys
saves, logs, out, *methods = sys.argv[1:]
rows = []
for method in methods:
    name, label, runs = method.split("|")
    runs = runs.split(",")
    rows.append({"name": name, "label": label, "runs": [f"{saves}/{r}" for r in runs],
                 "logs": [f"{logs}/{r}.log" for r in runs]})
open(out, "w").write(json.dumps({"base": "base", "reference": "full_ft", "methods": rows}, indent=2) + "\n")
PY
python -m moelpr_lab.comparison --eval_dir "$EVAL" --methods "$WORK/methods.json" \
    --output_dir "$WORK/comparison" 2>&1 | tee "$LOGS/comparison.log"
say "Done: $WORK/comparison/comparison.md"
