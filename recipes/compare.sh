#!/usr/bin/env bash
# Every pruning method on the seam at its default size, at several seeds, on one dashboard
# (issue 15): each method's point is its mean over the seeds with a min-max error bar, and
# seeds.md has each WER as mean ± standard deviation (n) with its range.
#   1. dense and adaptive dropout (gated, in budget mode: the same size at every seed) at every
#      seed, JOBS at a time; every gated run shrunk and decoded;
#   2. each at every seed, JOBS at a time: structured magnitude pruning of the dense run to
#      adaptive dropout's widths and to its size, unstructured magnitude, PLATON and SEVEN at
#      a keep ratio of KEEP%, the dense run fine-tuned as long unpruned (the reference of the
#      unstructured ones), and from scratch at adaptive dropout's widths and uniformly
#      narrower at its size;
#   3. one dashboard (conformer-prune report) over every run.
# Runs share names with recipes/embedded.sh, compare_structured.sh and compare_unstructured.sh,
# so a run one of them finished is not trained again. Every stage skips what is done (a run
# with results.json) and a killed run resumes from its last checkpoint: run it again to go on.
# Environment knobs: CORPUS, SEEDS (default "1986 2024 7"), JOBS (runs at a time, default 2,
# one core each), KEEP (unstructured keep ratio in percent, default 30), OUT (dashboard folder).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bash recipes/setup.sh
CORPUS=${CORPUS:-corpus}
SEEDS=${SEEDS:-"1986 2024 7"}
JOBS=${JOBS:-2}
KEEP=${KEEP:-30}
OUT=${OUT:-dashboard_compare}
source recipes/lib.sh

stage "corpus: 1.5 h of synthesised speech in $CORPUS"
conformer-prune synth-corpus --out "$CORPUS" --hours 1.5 --seed 1234

stage "character LM for the beam search (both cores; done: only its folder written again)"
train_lm

main=()  # the main command's two runs at every seed, first: the baselines start from them
for seed in $SEEDS; do
    main+=("$seed hparams/mini/conformer_dense.yaml conformer_dense_mini"
           "$seed hparams/mini/conformer_adrop.yaml conformer_adrop_mini")
done
stage "dense and adaptive dropout (gated) at seeds $SEEDS, $JOBS at a time"
JOBS=$JOBS train_queue "${main[@]}"

for seed in $SEEDS; do
    stage "seed $seed: shrink the gated model and decode the compact one"
    shrink_and_decode "results/conformer_adrop_mini/$seed"
done

keep_ratio=$(awk "BEGIN {print $KEEP / 100}")
# Method by method, each at every seed, the quick ones first: a run stopped half way has whole
# groups of seeds for the methods it reached.
methods=("hparams/mini/conformer_magnitude_widths.yaml conformer_magnitude_widths_mini"
         "hparams/mini/conformer_magnitude_global.yaml conformer_magnitude_global_mini")
for method in magnitude platon seven; do
    methods+=("hparams/mini/conformer_$method.yaml conformer_${method}_mini_keep$KEEP --prune_final_keep $keep_ratio")
done
methods+=("hparams/mini/conformer_finetune.yaml conformer_finetune_mini"
          "hparams/mini/conformer_scratch_widths.yaml conformer_scratch_widths_mini"
          "hparams/mini/conformer_scratch_uniform.yaml conformer_scratch_uniform_mini")
baselines=()
for spec in "${methods[@]}"; do
    for seed in $SEEDS; do baselines+=("$seed $spec"); done
done
stage "the baselines at seeds $SEEDS, $JOBS at a time"
JOBS=$JOBS train_queue "${baselines[@]}"

stage "dashboard: every run at every seed"
runs=()
for spec in "${main[@]}" "${baselines[@]}"; do
    read -r -a words <<< "$spec"
    runs+=("results/${words[2]}/${words[0]}")
done
conformer-prune report "${runs[@]}" --out "$OUT"
stage "done: open $OUT/index.html (seeds.md: mean ± standard deviation (n) per recipe)"
