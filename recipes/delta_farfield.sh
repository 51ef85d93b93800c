#!/usr/bin/env bash
# Fine-tuned variants stored as pruned deltas (issue 14, docs/DELTA.md). The base is the dense
# run of the main command; the domain is far-field audio (every split recorded across a noisy,
# reverberant room, built by the corpus builder with the studio corpus's seed, so the test
# sentences and voices are those of the base's test-clean). Stages, each skipping what is done
# (a rerun resumes):
#   1. the main command (corpus, dense and gated runs; only the dense run is used here);
#   2. the far-field corpus (0.5 h train, 0.1 h per evaluation split);
#   3. the base fine-tuned on it with plain Adam and with AdamR at each pull in PULLS;
#   4. delta sweeps: the Adam variant with DARE, DAREx-q (q by dev WER, unlabelled, analytic)
#      and magnitude; the AdamR variants at L2_PULLS with DARE (DAREx-L2); each at the drop
#      rates DROPS and mask seeds MASK_SEEDS; WER on the far-field test-clean for every seed
#      and on the base's test-clean for the first seed;
#   5. the dashboard (OUT/index.html, OUT/delta.md).
# The sweeps run as five processes side by side (one thread each); a 2-core machine takes
# about 1.5 h for stage 4 at the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-corpus}
FARFIELD=${FARFIELD:-corpus_farfield}
SEED=${SEED:-1986}
OUT=${OUT:-dashboard_delta}
PULLS=${PULLS:-"0.03 0.1 0.3 1.0"}
L2_PULLS=${L2_PULLS:-"0.03 0.1"}
DROPS=${DROPS:-0.5,0.9,0.95,0.99}
MASK_SEEDS=${MASK_SEEDS:-0,1,2}
JOBS=${JOBS:-2}
started=$(date +%s)
CORPUS=$CORPUS SEED=$SEED bash recipes/embedded.sh
source recipes/lib.sh

stage "far-field corpus: $FARFIELD"
conformer-prune synth-corpus --out "$FARFIELD" --hours 0.5 --eval-hours 0.1 --seed 1234 \
    --condition far-field | tail -n 1

stage "the dense run fine-tuned on far-field audio: Adam, and AdamR at pulls $PULLS"
specs=("hparams/mini/conformer_farfield.yaml conformer_farfield_mini_pull0.0")
for pull in $PULLS; do
    specs+=("hparams/mini/conformer_farfield.yaml conformer_farfield_mini_pull$pull --adamr_pull $pull")
done
CORPUS=$FARFIELD JOBS=$JOBS train_each "${specs[@]}"

stage "delta sweeps (drop rates $DROPS, mask seeds $MASK_SEEDS); logs results/delta_*.log"
base=results/conformer_dense_mini/$SEED
sweep() {  # sweep NAME PULL METHODS
    conformer-prune delta sweep "$base" "results/conformer_farfield_mini_pull$2/$SEED" \
        --data-folder "$FARFIELD" --base-data-folder "$CORPUS" --drops "$DROPS" \
        --seeds "$MASK_SEEDS" --methods "$3" --threads 1 --out "results/delta/$1" \
        > "results/delta_$1_$3.log" 2>&1
}
mkdir -p results/delta
# The Adam variant's methods in three processes, each AdamR variant in one more. A point does
# not depend on which process computes it (same seed, same mask; q chosen once per method and
# drop rate), so the split only balances the cores.
sweep adam 0.0 dare,magnitude &
sweep adam 0.0 darex_q_dev &
sweep adam 0.0 darex_q_unlabelled,darex_q_analytic &
sweeps=(results/delta/adam)
for pull in $L2_PULLS; do
    sweep "adamr$pull" "$pull" dare &
    sweeps+=("results/delta/adamr$pull")
done
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
if [ $failed = 1 ]; then echo "FAILED: see results/delta_*.log"; exit 1; fi

stage "dashboard"
conformer-prune delta report "${sweeps[@]}" --out "$OUT"
stage "done: open $OUT/index.html"
