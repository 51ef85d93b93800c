#!/usr/bin/env bash
# The README's main command: the whole pipeline on the embedded (synthesised) corpus, on CPU.
#   build corpus -> character LM -> prepare -> tokenizer -> train dense -> train gated -> shrink
#   -> decode -> [speed benchmark] -> dashboard
# Every stage skips work that is already done, so running it again resumes where it stopped.
# Environment knobs: CORPUS (folder), HOURS (train hours), SEED (training seed), OUT (dashboard),
# BENCHMARK=1 (also time dense against shrunk encoders, about 2.5 min: the dashboard's speed
# figure needs no benchmark, it plots each decode's real-time factor).
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup.sh

CORPUS=${CORPUS:-corpus}
HOURS=${HOURS:-1.5}
SEED=${SEED:-1986}
OUT=${OUT:-dashboard}
source recipes/lib.sh

stage "corpus: $HOURS h of synthesised speech in $CORPUS"
conformer-prune synth-corpus --out "$CORPUS" --hours "$HOURS" --seed 1234

stage "character LM for the beam search (both cores; done: only its folder written again)"
train_lm

stage "dense baseline and adaptive dropout (gated) model, side by side"
train_side_by_side hparams/mini/conformer_dense.yaml hparams/mini/conformer_adrop.yaml

run=results/conformer_adrop_mini/$SEED
stage "shrink the gated model and decode the compact one"
shrink_and_decode "$run"

if [ "${BENCHMARK:-0}" = 1 ]; then
    stage "speed: dense vs shrunk encoder"
    python benchmarks/shrink_speed.py --dense results/conformer_dense_mini/$SEED \
        --gated "$run" --compact "$run/compact" --data-folder "$CORPUS" \
        --out "$run/compact/benchmark.json"
fi

stage "dashboard"
conformer-prune report results --out "$OUT"
stage "done: open $OUT/index.html"
