#!/usr/bin/env bash
# Does torchrun with 2 processes train the mini gated recipe as one process does?
#   the single-process run: results/conformer_adrop_mini/$SEED (recipes/embedded.sh; trained
#   here if missing) -> the same YAML under torchrun, NPROC ranks, each taking 1/NPROC of every
#   batch of the single run (same global batches, same steps) -> side-by-side comparison
#   against the tolerance stated in benchmarks/ddp_vs_single.py.
# Environment knobs: CORPUS (folder), SEED (training seed), NPROC (processes).
set -euo pipefail
cd "$(dirname "$0")/.."

CORPUS=${CORPUS:-corpus}
SEED=${SEED:-1986}
NPROC=${NPROC:-2}
YAML=hparams/mini/conformer_adrop.yaml
source recipes/lib.sh

stage "character LM (the test stage decodes with it)"
train_lm

stage "single-process run (the reference)"
train_side_by_side "$YAML"

name=conformer_adrop_mini_ddp$NPROC
run=results/$name/$SEED
stage "torchrun --nproc_per_node=$NPROC -> $run (log: results/$name.log)"
if [ -f "$run/results.json" ]; then
    echo "$run: done (results.json), skipped"
else
    # The same YAML: every rank takes 1/NPROC of each of the single run's batches.
    torchrun --nproc_per_node="$NPROC" train.py "$YAML" --data_folder "$CORPUS" --seed "$SEED" \
        --experiment_name "$name" > "results/$name.log" 2>&1 \
        || { echo "FAILED: results/$name.log ends with:"; tail -n 30 "results/$name.log"; exit 1; }
fi

stage "single process vs torchrun"
python benchmarks/ddp_vs_single.py "results/conformer_adrop_mini/$SEED" "$run"
