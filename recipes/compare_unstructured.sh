#!/usr/bin/env bash
# Unstructured pruning during fine-tuning on the embedded corpus (issue 13): magnitude, PLATON
# and SEVEN from the dense run of the main command, each at final keep ratios of 50%, 30% and
# 10% of the encoder layers' weight matrices, beside the dense run fine-tuned as long unpruned; each stored sparse (conformer-prune shrink: bytes
# on disk); the encoder speed of one sparsity against dense and adaptive dropout
# (benchmarks/sparse_speed.py); one dashboard with dense and adaptive dropout beside them.
# Runs the main command first (corpus, dense, gated, shrink, decode); every stage skips what is
# done, so running it again resumes.
# Environment knobs: CORPUS, SEED, OUT (dashboard folder), JOBS (runs at a time), KEEPS (keep
# ratios in percent), SPEED_KEEP (the one timed; default the middle of KEEPS).
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-corpus}
SEED=${SEED:-1986}
OUT=${OUT:-dashboard_unstructured}
KEEPS=${KEEPS:-"50 30 10"}
JOBS=${JOBS:-2}
started=$(date +%s)
CORPUS=$CORPUS SEED=$SEED bash recipes/embedded.sh
source recipes/lib.sh

# The reference at equal training: the dense run fine-tuned the same 2 epochs, nothing pruned.
specs=("hparams/mini/conformer_finetune.yaml conformer_finetune_mini")
for keep in $KEEPS; do
    for method in magnitude platon seven; do
        specs+=("hparams/mini/conformer_$method.yaml conformer_${method}_mini_keep$keep --prune_final_keep $(awk "BEGIN {print $keep / 100}")")
    done
done
stage "dense fine-tuned on; magnitude, PLATON and SEVEN at keep ratios $KEEPS (%); $JOBS at a time"
JOBS=$JOBS train_each "${specs[@]}"

stage "sparse storage: conformer-prune shrink of each run (bytes in shrink_report.json)"
runs=()
for keep in $KEEPS; do
    for method in magnitude platon seven; do
        run=results/conformer_${method}_mini_keep$keep/$SEED
        conformer-prune shrink "$run" --out "$run/compact" | tail -n 2
        runs+=("$run")
    done
done

SPEED_KEEP=${SPEED_KEEP:-$(echo $KEEPS | awk '{print $int((NF + 1) / 2)}')}  # the middle one
stage "encoder speed: SEVEN at $SPEED_KEEP% (dense and sparse kernels) vs dense and adaptive dropout"
python benchmarks/sparse_speed.py --dense "results/conformer_dense_mini/$SEED" \
    --sparse "results/conformer_seven_mini_keep$SPEED_KEEP/$SEED" \
    --compact "results/conformer_adrop_mini/$SEED/compact" --data-folder "$CORPUS" \
    --out "results/conformer_seven_mini_keep$SPEED_KEEP/$SEED/sparse_speed.json"

stage "dashboard"
conformer-prune report "results/conformer_dense_mini/$SEED" "results/conformer_adrop_mini/$SEED" \
    "results/conformer_finetune_mini/$SEED" "${runs[@]}" --out "$OUT"
stage "done: open $OUT/index.html"
