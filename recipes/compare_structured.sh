#!/usr/bin/env bash
# Structured pruning at equal size on the embedded corpus, on one dashboard (README, second
# command): dense; adaptive dropout, shrunk; structured magnitude pruning of the dense model to
# (a) adaptive dropout's widths and (b) its encoder size with one global ranking, each then
# fine-tuned; small models from scratch with (a) adaptive dropout's exact architecture and
# (b) a uniformly narrower Conformer of its encoder size.
# Runs the main command first (corpus, dense, gated, shrink, decode), then the four baselines
# two at a time. Every stage skips what is done, so running it again resumes.
# Environment knobs: CORPUS, SEED, OUT (dashboard folder), as recipes/embedded.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-corpus}
SEED=${SEED:-1986}
OUT=${OUT:-dashboard_structured}
started=$(date +%s)
CORPUS=$CORPUS SEED=$SEED bash recipes/embedded.sh
source recipes/lib.sh

stage "structured magnitude: adaptive dropout's widths, and its size by a global ranking"
train_side_by_side hparams/mini/conformer_magnitude_widths.yaml \
    hparams/mini/conformer_magnitude_global.yaml

stage "from scratch: adaptive dropout's architecture, and a uniformly narrower model"
train_side_by_side hparams/mini/conformer_scratch_widths.yaml \
    hparams/mini/conformer_scratch_uniform.yaml

stage "dashboard"
runs=()
for name in dense adrop magnitude_widths magnitude_global scratch_widths scratch_uniform; do
    runs+=("results/conformer_${name}_mini/$SEED")
done
conformer-prune report "${runs[@]}" --out "$OUT"
stage "done: open $OUT/index.html"
