# Sourced by scripts/demo.sh and scripts/paper_budget.sh (from the repository root): one resumable training run,
# and when their evaluation must run again.
#
# train NAME YAML MODEL DATASETS SAMPLES STEPS [KEY=VALUE...]: one llamafactory-cli run into $SAVES/NAME, skipped
# when it finished before (train_results.json); the extra KEY=VALUE pairs override the recipe. With SAVE_STEPS set,
# the run saves a full checkpoint (weights, optimizer, scheduler, RNG) every SAVE_STEPS steps and, when started again
# after being stopped, continues from the last one (LLaMA-Factory's resume_from_checkpoint); without it a stopped run
# starts over. A finished run's checkpoints are deleted. Reads SAVES, LOGS, CORPORA, LOGGING_STEPS, MOELPR_DEMO_BF16 and SAVE_STEPS.
train() {
    local name=$1 yaml=$2 model=$3 datasets=$4 samples=$5 steps=$6
    local out=$SAVES/$name
    if [ -f "$out/train_results.json" ]; then echo "[train] $out exists, skipping"; return; fi
    local resume=()
    if [ -n "${SAVE_STEPS:-}" ]; then
        local last
        last=$(ls -d "$out"/checkpoint-* 2>/dev/null | sort -V | tail -n 1 || true)
        resume=(save_strategy=steps save_steps="$SAVE_STEPS" save_total_limit=1 save_only_model=false)
        if [ -n "$last" ]; then
            echo "[train] resuming $name from $last"
            resume+=(resume_from_checkpoint="$last")
        fi
    fi
    # The log is appended to, so a resumed run keeps the lines of its first part (the comparison reads them).
    llamafactory-cli train "$yaml" model_name_or_path="$model" dataset_dir="$CORPORA" dataset="$datasets" \
        max_samples="$samples" max_steps="$steps" output_dir="$out" logging_steps="$LOGGING_STEPS" \
        bf16="$MOELPR_DEMO_BF16" "${resume[@]}" "${@:7}" 2>&1 | tee -a "$LOGS/$name.log"
    rm -rf "$out"/checkpoint-*   # finished: the optimizer states are not needed any more
}

# eval_stale EVAL_DIR RUN_DIR...: true when EVAL_DIR has no perplexity.json, when the report is older than a run's
# train_results.json, or when it predates --max_tokens being spread over the documents (it then measured each
# language's first pages only).
eval_stale() {
    local report=$1/perplexity.json run
    [ -f "$report" ] || return 0
    grep -q max_tokens_spread_over_documents "$report" || return 0
    for run in "${@:2}"; do [ "$run/train_results.json" -nt "$report" ] && return 0; done
    return 1
}
