#!/usr/bin/env python3
"""One joint-search step of the character LM, float against int8 (`lm.quantize_lm_int8`).

    python benchmarks/lm_int8_step.py results/lm_char_mini

The search runs the LM once per step on every hypothesis: here a batch of 16 utterances x beam
8, one token each, with the hidden state of an earlier step, as SpeechBrain's RNNLMScorer does.
Timings alternate between the two models (interleaved medians); the report also gives the
largest difference of their log-probabilities on this step.
"""

import argparse

import torch

from common import interleaved_medians, machine, write_report
from conformer_prune.lm import load_lm, quantize_lm_int8


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lm_folder", help="a folder written by train_lm.py")
    parser.add_argument("--hypotheses", type=int, default=128, help="utterances x beam")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30, help="timed blocks of 20 steps")
    parser.add_argument("--out", help="also write the report as JSON here")
    return parser.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"float": load_lm(args.lm_folder), "int8": quantize_lm_int8(load_lm(args.lm_folder))}
    vocabulary = models["float"].out.w.out_features
    tokens = torch.randint(0, vocabulary, (args.hypotheses, 1))
    with torch.no_grad():
        hidden = {name: lm(tokens)[1] for name, lm in models.items()}  # an earlier step's
        log_probs = {name: lm(tokens, hx=hidden[name])[0].log_softmax(-1)
                     for name, lm in models.items()}

        def steps(name):
            return lambda: [models[name](tokens, hx=hidden[name]) for _ in range(20)]

        seconds = interleaved_medians({name: steps(name) for name in models}, args.repeats)
    report = {
        "machine": machine(),
        "hypotheses": args.hypotheses,
        "ms_per_step": {name: round(value / 20 * 1e3, 3) for name, value in seconds.items()},
        "speedup_int8": round(seconds["float"] / seconds["int8"], 2),
        "max_abs_log_prob_difference": float((log_probs["float"] - log_probs["int8"]).abs().max()),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
