#!/usr/bin/env bash
# The learning-rate sweep behind the comparison's LoRA and LLaMA-Pro recipes (docs/comparison.md): each method
# trains on the comparison's data and token budget at doubling learning rates (the grids began with the lower
# three and grew while the best sat at their top edge), and the one with the lowest mean perplexity
# on the new languages' development documents (training documents the runs never see) is kept.
# Nothing is judged on the held-out text the comparison reports.
#
#   bash scripts/compare.sh && bash scripts/lr_sweep.sh   # outputs in work/compare/sweep/
#
# Runs after scripts/compare.sh (it reuses its corpora, base model and LLaMA-Pro expansion); each finished run is
# skipped on a second call. MOELPR_DEMO_DIR as for compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${MOELPR_DEMO_DIR:-work/compare}
BASE_MODEL=${MOELPR_CACHE_DIR:-work/cache}/models/smollm2-135m-instruct
CORPORA=$WORK/corpora
SWEEP=$WORK/sweep
NEW_TRAIN=hu_train,tr_train,el_train
# The recipes train on the first 1000 documents of each corpus (max_samples); documents from 1500 on are unseen.
DEV_FROM=1500
LORA_RATES=(5.0e-4 1.0e-3 2.0e-3 4.0e-3)
LLAMA_PRO_RATES=(2.5e-4 5.0e-4 1.0e-3 2.0e-3 4.0e-3 8.0e-3)
BF16=${MOELPR_DEMO_BF16:-$(grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo true || echo false)}
EVAL_DTYPE=()
[ "$BF16" = true ] && EVAL_DTYPE=(--bf16)

for needed in "$CORPORA/dataset_info.json" "$BASE_MODEL/config.json" "$WORK/models/llama_pro/config.json"; do
    [ -f "$needed" ] || { echo "lr_sweep.sh: $needed is missing; run bash scripts/compare.sh first" >&2; exit 1; }
done
mkdir -p "$SWEEP/dev" "$SWEEP/logs"
for lang in hu tr el; do
    tail -n +$((DEV_FROM + 1)) "$CORPORA/${lang}_train.jsonl" > "$SWEEP/dev/${lang}_dev.jsonl"
    [ -s "$SWEEP/dev/${lang}_dev.jsonl" ] || { echo "lr_sweep.sh: ${lang}_train has no document past $DEV_FROM" >&2; exit 1; }
done

# run NAME YAML MODEL LR: one llamafactory-cli run of the comparison's budget (the recipe's 60 steps).
run() {
    local name=$1 yaml=$2 model=$3 lr=$4
    if [ -f "$SWEEP/$name/train_results.json" ]; then echo "[sweep] $name exists, skipping"; return; fi
    llamafactory-cli train "$yaml" model_name_or_path="$model" dataset_dir="$CORPORA" dataset="$NEW_TRAIN" \
        output_dir="$SWEEP/$name" learning_rate="$lr" bf16="$BF16" 2>&1 | tee "$SWEEP/logs/$name.log"
}

models=()
for lr in "${LORA_RATES[@]}"; do
    run "lora_$lr" examples/lora/demo_lora.yaml "$BASE_MODEL" "$lr"
    if [ ! -f "$SWEEP/lora_${lr}_merged/config.json" ]; then
        llamafactory-cli export examples/lora/demo_lora_merge.yaml model_name_or_path="$BASE_MODEL" \
            adapter_name_or_path="$SWEEP/lora_$lr" export_dir="$SWEEP/lora_${lr}_merged"
    fi
    models+=(--model "lora_$lr=$SWEEP/lora_${lr}_merged")
done
for lr in "${LLAMA_PRO_RATES[@]}"; do
    run "llama_pro_$lr" examples/llama_pro/demo_llama_pro.yaml "$WORK/models/llama_pro" "$lr"
    models+=(--model "llama_pro_$lr=$SWEEP/llama_pro_$lr")
done

moelpr eval "${models[@]}" --heldout hu="$SWEEP/dev/hu_dev.jsonl" --heldout tr="$SWEEP/dev/tr_dev.jsonl" \
    --heldout el="$SWEEP/dev/el_dev.jsonl" --max_tokens 8192 --cutoff_len 256 "${EVAL_DTYPE[@]}" \
    --output_dir "$SWEEP/eval" 2>&1 | tee "$SWEEP/logs/eval.log"
python - "$SWEEP/eval/perplexity.json" <<'PY'
import json, math, sys
models = json.load(open(sys.argv[1]))["models"]
mean = {name: math.exp(sum(math.log(c["perplexity"]) for c in m["languages"].values()) / len(m["languages"]))
        for name, m in models.items()}
for method in ("lora", "llama_pro"):
    runs = {name: value for name, value in mean.items() if name.rsplit("_", 1)[0] == method}
    for name, value in runs.items():
        print(f"{name}: geometric mean dev perplexity over hu, tr, el = {value:.2f}")
    print(f"{method}: best learning rate {min(runs, key=runs.get).rsplit('_', 1)[1]}")
PY
