#!/usr/bin/env bash
# The learning-rate sweep behind the comparison's dense recipes (docs/comparison.md): full continual training, LoRA
# and LLaMA-Pro each train on the comparison's data and token budget at doubling learning rates (the grids began
# with a few rates and grow while the best sits at their edge), and per method the rate with the lowest geometric
# mean perplexity over hu, tr and el on development documents (training documents the runs never see) is kept.
# The base model is evaluated beside them: a rate that does not end below it on the new languages learned nothing.
# Nothing is judged on the held-out text the comparison reports.
#
#   bash scripts/compare.sh && bash scripts/lr_sweep.sh     # SmolLM2; outputs in work/compare/sweep/
#   bash scripts/compare.sh --base gemma3-270m && bash scripts/lr_sweep.sh --base gemma3-270m
#                                                           # Gemma 3 270M; outputs in work/compare-gemma3-270m/sweep/
#   bash scripts/lr_sweep.sh --quick [--base ...]           # after compare.sh --quick [--base ...]: one rate per
#                                                           # method, 2 steps each (a smoke run of the script)
#   --methods full_ft,lora,llama_pro                        # a subset (default: all three)
#
# Runs after scripts/compare.sh with the same --base and --quick (it reuses its corpora, base model and LLaMA-Pro
# expansion); each finished run is skipped on a second call, and with --base gemma3-270m a stopped run resumes from
# its last checkpoint. MOELPR_DEMO_DIR and MOELPR_CACHE_DIR as for compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=smollm2
QUICK=0
METHODS=full_ft,lora,llama_pro
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --base) [ $# -ge 2 ] || { echo "lr_sweep.sh: --base needs a value (smollm2 or gemma3-270m)" >&2; exit 2; }
                BASE=$2; shift ;;
        --base=*) BASE=${1#--base=} ;;
        --methods) [ $# -ge 2 ] || { echo "lr_sweep.sh: --methods needs a value (full_ft,lora,llama_pro)" >&2; exit 2; }
                   METHODS=$2; shift ;;
        --methods=*) METHODS=${1#--methods=} ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "lr_sweep.sh: unknown option $1 (use --base, --quick, --methods or --help)" >&2; exit 2 ;;
    esac
    shift
done
for method in ${METHODS//,/ }; do
    case "$method" in full_ft|lora|llama_pro) ;;
        *) echo "lr_sweep.sh: unknown method $method in --methods (use full_ft, lora, llama_pro)" >&2; exit 2 ;;
    esac
done

# Per base: where compare.sh put its outputs, and the grids. SmolLM2's LoRA and LLaMA-Pro grids are the published
# sweep's; its full-training grid brackets the demo's 5e-4. On Gemma 3 270M the SmolLM2 rates diverged (full
# training 5e-4, LoRA 2e-3, LLaMA-Pro 4e-3: docs/comparison.md), so its grids start 4-16x lower.
case "$BASE" in
    smollm2) BASE_DIR=smollm2-135m-instruct; NAME=compare; SAVE_STEPS=
             FULL_FT_RATES=(1.25e-4 2.5e-4 5.0e-4 1.0e-3)
             LORA_RATES=(5.0e-4 1.0e-3 2.0e-3 4.0e-3)
             LLAMA_PRO_RATES=(2.5e-4 5.0e-4 1.0e-3 2.0e-3 4.0e-3 8.0e-3) ;;
    gemma3-270m) BASE_DIR=gemma3-270m; NAME=compare-gemma3-270m; SAVE_STEPS=${MOELPR_SAVE_STEPS:-20}
                 FULL_FT_RATES=(1.25e-5 2.5e-5 5.0e-5 1.0e-4)
                 LORA_RATES=(1.25e-4 2.5e-4 5.0e-4 1.0e-3)
                 LLAMA_PRO_RATES=(1.25e-4 2.5e-4 5.0e-4 1.0e-3) ;;
    *) echo "lr_sweep.sh: unknown --base $BASE (use smollm2 or gemma3-270m)" >&2; exit 2 ;;
esac
if [ "$QUICK" = 1 ]; then
    # One rate per method (the grid's third), 2 steps on 40 documents: checks the script, not the rates.
    FULL_FT_RATES=("${FULL_FT_RATES[2]}"); LORA_RATES=("${LORA_RATES[2]}"); LLAMA_PRO_RATES=("${LLAMA_PRO_RATES[2]}")
    NAME=$NAME-quick; STEPS=2; MAX_SAMPLES=40; DEV_FROM=40; EVAL_TOKENS=512; LOGGING_STEPS=1
else
    # The recipes train on the first 1000 documents of each corpus (max_samples); documents from 1500 on are unseen.
    STEPS=60; MAX_SAMPLES=1000; DEV_FROM=1500; EVAL_TOKENS=8192; LOGGING_STEPS=5
fi

WORK=${MOELPR_DEMO_DIR:-work/$NAME}
BASE_MODEL=${MOELPR_CACHE_DIR:-work/cache}/models/$BASE_DIR
CORPORA=$WORK/corpora
SWEEP=$WORK/sweep
SAVES=$SWEEP
LOGS=$SWEEP/logs
NEW_TRAIN=hu_train,tr_train,el_train
MOELPR_DEMO_BF16=${MOELPR_DEMO_BF16:-$(grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo true || echo false)}
EVAL_DTYPE=()
[ "$MOELPR_DEMO_BF16" = true ] && EVAL_DTYPE=(--bf16)
quick_flag=()
[ "$QUICK" = 1 ] && quick_flag=(--quick)

for needed in "$CORPORA/dataset_info.json" "$BASE_MODEL/config.json" "$WORK/models/llama_pro/config.json"; do
    [ -f "$needed" ] || { echo "lr_sweep.sh: $needed is missing; run bash scripts/compare.sh --base $BASE ${quick_flag[*]} first" >&2; exit 1; }
done
mkdir -p "$SWEEP/dev" "$LOGS"
for lang in hu tr el; do
    tail -n +$((DEV_FROM + 1)) "$CORPORA/${lang}_train.jsonl" > "$SWEEP/dev/${lang}_dev.jsonl"
    [ -s "$SWEEP/dev/${lang}_dev.jsonl" ] || { echo "lr_sweep.sh: ${lang}_train has no document past $DEV_FROM" >&2; exit 1; }
done

source scripts/train_run.sh   # train NAME YAML MODEL DATASETS SAMPLES STEPS [KEY=VALUE...]

models=(--model "base=$BASE_MODEL")
wanted() { [[ ",$METHODS," == *",$1,"* ]]; }
if wanted full_ft; then
    for lr in "${FULL_FT_RATES[@]}"; do
        train "full_ft_$lr" examples/moelpr/demo/demo_full_ft.yaml "$BASE_MODEL" "$NEW_TRAIN" "$MAX_SAMPLES" "$STEPS" \
            learning_rate="$lr"
        models+=(--model "full_ft_$lr=$SWEEP/full_ft_$lr")
    done
fi
if wanted lora; then
    for lr in "${LORA_RATES[@]}"; do
        train "lora_$lr" examples/lora/demo_lora.yaml "$BASE_MODEL" "$NEW_TRAIN" "$MAX_SAMPLES" "$STEPS" learning_rate="$lr"
        if [ ! -f "$SWEEP/lora_${lr}_merged/config.json" ]; then
            llamafactory-cli export examples/lora/demo_lora_merge.yaml model_name_or_path="$BASE_MODEL" \
                adapter_name_or_path="$SWEEP/lora_$lr" export_dir="$SWEEP/lora_${lr}_merged"
        fi
        models+=(--model "lora_$lr=$SWEEP/lora_${lr}_merged")
    done
fi
if wanted llama_pro; then
    for lr in "${LLAMA_PRO_RATES[@]}"; do
        train "llama_pro_$lr" examples/llama_pro/demo_llama_pro.yaml "$WORK/models/llama_pro" "$NEW_TRAIN" "$MAX_SAMPLES" \
            "$STEPS" learning_rate="$lr"
        models+=(--model "llama_pro_$lr=$SWEEP/llama_pro_$lr")
    done
fi

moelpr eval "${models[@]}" --heldout hu="$SWEEP/dev/hu_dev.jsonl" --heldout tr="$SWEEP/dev/tr_dev.jsonl" \
    --heldout el="$SWEEP/dev/el_dev.jsonl" --max_tokens "$EVAL_TOKENS" --cutoff_len 256 "${EVAL_DTYPE[@]}" \
    --output_dir "$SWEEP/eval" 2>&1 | tee "$LOGS/eval.log"
# The selection rule: per method, the lowest geometric-mean development perplexity over hu, tr and el; said plainly
# when even that rate is not below the base model's (the method learned nothing at any rate of the grid).
python - "$SWEEP/eval/perplexity.json" "$METHODS" <<'PY' | tee "$SWEEP/selection.txt"
import json, math, sys
models = json.load(open(sys.argv[1]))["models"]
mean = {name: math.exp(sum(math.log(c["perplexity"]) for c in m["languages"].values()) / len(m["languages"]))
        for name, m in models.items()}
print(f"base: geometric mean dev perplexity over hu, tr, el = {mean['base']:.2f}")
for method in sys.argv[2].split(","):
    runs = {name: value for name, value in mean.items() if name.rsplit("_", 1)[0] == method}
    for name, value in runs.items():
        print(f"{name}: geometric mean dev perplexity over hu, tr, el = {value:.2f}")
    best = min(runs, key=runs.get)
    verdict = "" if runs[best] < mean["base"] else " (not below the base model: no rate of the grid learns)"
    print(f"{method}: best learning rate {best.rsplit('_', 1)[1]}{verdict}")
PY
