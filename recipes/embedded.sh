#!/usr/bin/env bash
# The README's main command: the whole pipeline on the embedded (synthesised) corpus, on CPU.
#   build corpus -> prepare -> tokenizer -> train dense -> train gated -> shrink -> decode
#   -> benchmark -> dashboard
# Every stage skips work that is already done, so running it again resumes where it stopped.
# Environment knobs: CORPUS (folder), HOURS (train hours), SEED (training seed), OUT (dashboard).
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup.sh

CORPUS=${CORPUS:-corpus}
HOURS=${HOURS:-1.5}
SEED=${SEED:-1986}
OUT=${OUT:-dashboard}
started=$(date +%s)
stage() { echo "=== [$(( $(date +%s) - started ))s] $*"; }

stage "corpus: $HOURS h of synthesised speech in $CORPUS"
conformer-prune synth-corpus --out "$CORPUS" --hours "$HOURS" --seed 1234

# The two trainings run side by side, one core each (num_threads: 1 in the mini YAMLs): on a
# 2-core machine that is faster than one after the other with two threads each.
stage "dense baseline and adaptive dropout (gated) model, side by side"
mkdir -p results
python train.py hparams/mini/conformer_dense.yaml --data_folder "$CORPUS" --seed "$SEED" \
    > results/conformer_dense_mini.log 2>&1 &
dense_pid=$!
python train.py hparams/mini/conformer_adrop.yaml --data_folder "$CORPUS" --seed "$SEED" \
    > results/conformer_adrop_mini.log 2>&1 &
adrop_pid=$!
wait "$dense_pid" || { tail -n 30 results/conformer_dense_mini.log; exit 1; }
wait "$adrop_pid" || { tail -n 30 results/conformer_adrop_mini.log; exit 1; }

run=results/conformer_adrop_mini/$SEED
stage "shrink the gated model"
conformer-prune shrink "$run" --out "$run/compact"

stage "decode the compact model"
conformer-prune decode "$run/compact" --data-folder "$CORPUS"

stage "speed: dense vs shrunk encoder"
python benchmarks/shrink_speed.py --dense results/conformer_dense_mini/$SEED \
    --gated "$run" --compact "$run/compact" --data-folder "$CORPUS" \
    --out "$run/compact/benchmark.json"

stage "dashboard"
conformer-prune report results --out "$OUT"
stage "done: open $OUT/index.html"
