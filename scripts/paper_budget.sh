#!/usr/bin/env bash
# The paper's budgets on the demo's base (SmolLM2-135M-Instruct, the demo's corpora and recipes). Long: hours on a
# 2-core CPU. Every training run checkpoints and resumes where it stopped, every finished step is skipped, so run it
# in the background and start it again after it was stopped (see docs/comparison.md, "The paper's multilingual claims"):
#
#   nohup bash scripts/paper_budget.sh --review-budget > work/review-budget.log 2>&1 &
#   nohup bash scripts/paper_budget.sh --layermoe > work/layermoe.log 2>&1 &
#
#   --review-budget  stage 1 of 600 steps (10x the demo's 61,440 tokens: 614,400), then reviews of 1%, 2%, 5%, 10%
#                    and 33% of its tokens (6, 12, 30, 60 and 200 steps) in three arms: the paper's LPR form, the
#                    authors', and the same replay without LPR; the 5% ones with a second seed and again over 4x the
#                    steps at batch 1; dense full training of 600 steps as the reference. work/review-budget/
#   --budgets LIST   with --review-budget: only these reviews, each in the three arms, in this order (default
#                    5,5seed2,5x4,33,1,2,10): a share in percent, 5seed2 the 5% reviews with the second seed, 5x4
#                    the 5% reviews over 4x the steps
#   --no_reference   with --review-budget: skip the dense reference (its 600 steps cost as much as stage 1)
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
BUDGETS=5,5seed2,5x4,33,1,2,10
REFERENCE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --review-budget) MODE=review-budget ;;
        --layermoe) MODE=layermoe ;;
        --quick) QUICK=1 ;;
        --budgets) [ $# -ge 2 ] || { echo "paper_budget.sh: --budgets needs a value (e.g. 5,33)" >&2; exit 2; }
                   BUDGETS=$2; shift ;;
        --budgets=*) BUDGETS=${1#--budgets=} ;;
        --no_reference) REFERENCE=0 ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "paper_budget.sh: unknown option $1 (use --review-budget, --layermoe, --budgets, --no_reference," \
                "--quick or --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$MODE" ] || { echo "paper_budget.sh: choose --review-budget or --layermoe (see --help)" >&2; exit 2; }
for budget in ${BUDGETS//,/ }; do
    case "$budget" in 1|2|5|5seed2|5x4|10|33) ;;
        *) echo "paper_budget.sh: unknown review $budget in --budgets (use 1, 2, 5, 5seed2, 5x4, 10, 33)" >&2; exit 2 ;;
    esac
done

CACHE=${MOELPR_CACHE_DIR:-work/cache}
BASE_MODEL=$CACHE/models/smollm2-135m-instruct
if [ "$QUICK" = 1 ]; then
    WORK=${MOELPR_BUDGET_DIR:-work/$MODE-quick}
    CORPUS_ARGS=(--max_documents 120 --max_train_chars 60000)
    STAGE1_STEPS=4; LONG_STAGE1_STEPS=8; REVIEW_STEPS=2
    # share:steps:replay documents per dataset (the quick form: a step or a few each)
    REVIEW_BUDGETS=(1:1:10 2:1:10 5:1:10 10:2:10 33:3:10)
    MAX_SAMPLES=40; REPLAY_SAMPLES=10; LOGGING_STEPS=1; EVAL_TOKENS=512; SAVE_STEPS=${MOELPR_SAVE_STEPS:-2}
    ALLOCATION_TOKENS=2000
else
    WORK=${MOELPR_BUDGET_DIR:-work/$MODE}
    CORPUS_ARGS=()
    # The demo's 60 + 20 steps; the long stage 1 is 10x. A step of either stage is the recipes' batch of 4 blocks of
    # 256 tokens, so a review's share of stage 1's tokens is its share of the steps. Each review draws from the
    # first N documents of each replayed corpus (max_samples), about its steps' worth of text, not a small pool
    # repeated: share:steps:N.
    STAGE1_STEPS=60; LONG_STAGE1_STEPS=600; REVIEW_STEPS=20
    REVIEW_BUDGETS=(1:6:100 2:12:100 5:30:100 10:60:200 33:200:1000)
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
REVIEWS=()   # name|arm|share|steps|batch|seed of every review, for the review-budget table
if [ "$MODE" = review-budget ]; then
    upcycle upcycled --num_experts 4 --topk 2
    say "Stage 1: $LONG_STAGE1_STEPS steps on hu/tr/el (10x the demo)"
    train stage1 "$STAGE1" "$MODELS_DIR/upcycled" "$NEW_TRAIN" 100000 "$LONG_STAGE1_STEPS"
    MODELS+=(stage1="$SAVES/stage1")
    METHODS+=("stage1|MoE stage 1 only|stage1")
    # review NAME ARM SHARE STEPS SAMPLES BATCH SEED: one review of stage 1. ARM paper or authors (lpr_loss_form),
    # none (lpr_loss_coef 0: the same replay, routers trained by the language-modelling loss alone). The recipe's
    # schedule for every length: cosine to 0 after a 5% linear warm-up (at least one step).
    review() {
        local name=$1 arm=$2 share=$3 steps=$4 samples=$5 batch=$6 seed=$7 lpr=(lpr_loss_form=paper)
        [ "$arm" = authors ] && lpr=(lpr_loss_form=authors)
        [ "$arm" = none ] && lpr=(lpr_loss_coef=0)
        say "Review $name: $share% of stage 1's tokens, $steps steps of batch $batch, arm $arm, seed $seed"
        train "$name" "$STAGE2" "$SAVES/stage1" "$REPLAY" "$samples" "$steps" "${lpr[@]}" \
            per_device_train_batch_size="$batch" seed="$seed"
        MODELS+=("$name=$SAVES/$name")
        METHODS+=("$name|MoE-LPR, review $share%, $arm ($steps x $batch, seed $seed)|stage1,$name")
        REVIEWS+=("$name|$arm|$share|$steps|$batch|$seed")
    }
    # 5seed2: a second review seed (same stage 1). 5x4: the 5% review's tokens over 4x the steps at batch 1, whether
    # the share of tokens or the number of router steps decides (4 blocks per step do not split in 3).
    for budget in ${BUDGETS//,/ }; do
        share=${budget%%[!0-9]*}
        for entry in "${REVIEW_BUDGETS[@]}"; do
            IFS=: read -r entry_share steps samples <<<"$entry"
            [ "$entry_share" = "$share" ] || continue
            for arm in paper authors none; do
                case "$budget" in
                    *seed2) review "review${share}_${arm}_seed2" "$arm" "$share" "$steps" "$samples" 4 43 ;;
                    *x4) review "review${share}x4_$arm" "$arm" "$share" "$((steps * 4))" "$samples" 1 42 ;;
                    *) review "review${share}_$arm" "$arm" "$share" "$steps" "$samples" 4 42 ;;
                esac
            done
        done
    done
    if [ "$REFERENCE" = 1 ]; then
        say "Reference: dense full training, $LONG_STAGE1_STEPS steps"
        train full_ft "$FULL_FT" "$BASE_MODEL" "$NEW_TRAIN" 100000 "$LONG_STAGE1_STEPS"
    fi
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

# The dense reference is evaluated wherever it was trained (by this call or an earlier one).
if [ "$MODE" = review-budget ] && [ -f "$SAVES/full_ft/train_results.json" ]; then
    MODELS+=(full_ft="$SAVES/full_ft")
    METHODS=("full_ft|Full continual training|full_ft" "${METHODS[@]}")
fi

say "Evaluation: held-out perplexity per language ($EVAL_TOKENS tokens each)"
# Stale also when the models asked for are not the ones evaluated (another --budgets).
EVALUATED=$(printf '%s\n' "${MODELS[@]}" | sort)
if eval_stale "$EVAL" "$SAVES"/*/ || [ "$EVALUATED" != "$(cat "$EVAL/models.txt" 2>/dev/null)" ]; then
    args=()
    for model in "${MODELS[@]}"; do args+=(--model "$model"); done
    for lang in hu tr el en en_general; do args+=(--heldout "$lang=$CORPORA/${lang}_heldout.jsonl"); done
    moelpr eval "${args[@]}" --old_languages en,en_general --max_tokens "$EVAL_TOKENS" --cutoff_len 256 \
        "${EVAL_DTYPE[@]}" --output_dir "$EVAL" 2>&1 | tee "$LOGS/eval.log"
    echo "$EVALUATED" > "$EVAL/models.txt"
fi

if [ "$MODE" = review-budget ]; then
    say "Review-budget table and picture"
    python - "$WORK/reviews.json" "$LONG_STAGE1_STEPS" "${REVIEWS[@]}" <<'PY'
import json, sys
out, stage1_steps, *reviews = sys.argv[1:]
TOKENS_PER_BLOCK = 256  # the recipes' cutoff_len; stage 1's batch is 4 blocks
rows = []
for review in reviews:
    name, arm, share, steps, batch, seed = review.split("|")
    rows.append({"name": name, "arm": arm, "percent": float(share), "steps": int(steps), "batch": int(batch),
                 "seed": int(seed), "tokens": int(steps) * int(batch) * TOKENS_PER_BLOCK})
spec = {"base": "base", "stage1": "stage1", "stage1_tokens": int(stage1_steps) * 4 * TOKENS_PER_BLOCK, "reviews": rows}
open(out, "w").write(json.dumps(spec, indent=2) + "\n")
PY
    python -m moelpr_lab.review_budget --eval_dir "$EVAL" --reviews "$WORK/reviews.json" \
        --output_dir "$WORK/review_budget" 2>&1 | tee "$LOGS/review_budget.log"
fi

# The comparison's table (gain share of the dense reference) wherever the reference was trained.
[ -f "$SAVES/full_ft/train_results.json" ] || { say "Done: $WORK/review_budget/review_budget.md"; exit 0; }
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
say "Done: $WORK/comparison/comparison.md${REVIEWS:+, $WORK/review_budget/review_budget.md}"
