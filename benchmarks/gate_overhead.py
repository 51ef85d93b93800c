#!/usr/bin/env python3
"""Training-step time of the gated model over the plain model, measured in one run.

    python benchmarks/gate_overhead.py [--config hparams/mini/conformer_adrop.yaml]

Both models have the YAML's architecture and identical weights; a step is forward, joint
CTC/attention loss (plus the retention regulariser for the gated model), backward and an
optimizer step on the same random batch of filterbank features. Steps of the two models
alternate so that a change of machine load hits both alike. Target: ratio at most 1.10.
"""

import argparse
import copy
import json

import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.nnet.losses import ctc_loss, kldiv_loss

from common import interleaved_medians, machine
from conformer_prune.gated_conformer import insert_gates
from conformer_prune.model import build_from_arch

# Training progress at which the regulariser is evaluated: late, in the commit phase when the
# YAML declares one, where it also builds each gate's keep mask (its most expensive form).
PROGRESS = 0.9


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="hparams/mini/conformer_adrop.yaml")
    parser.add_argument("--batch", type=int, default=16, help="utterances per batch")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per utterance")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def make_step(modules, batch, regulariser=None):
    feats, tokens_bos, tokens_eos, tokens, lens, token_lens = batch
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-4)

    def step():
        src = modules.CNN(feats)
        enc, pred = modules.Transformer(src, tokens_bos, lens, pad_idx=0)
        p_ctc = modules.ctc_lin(enc).log_softmax(-1)
        p_seq = modules.seq_lin(pred).log_softmax(-1)
        loss = 0.3 * ctc_loss(p_ctc, tokens, lens, token_lens, blank_index=0)
        loss = loss + 0.7 * kldiv_loss(p_seq, tokens_eos, length=token_lens)
        if regulariser is not None:
            loss = loss + regulariser(modules, PROGRESS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def random_batch(args, vocab_size):
    generator = torch.Generator().manual_seed(0)
    frames = int(args.seconds * 100)
    feats = torch.randn(args.batch, frames, 80, generator=generator)
    tokens = torch.randint(3, vocab_size, (args.batch, 12), generator=generator)
    bos = torch.cat([torch.ones(args.batch, 1, dtype=torch.long), tokens], dim=1)
    eos = torch.cat([tokens, torch.full((args.batch, 1), 2)], dim=1)
    lens = torch.ones(args.batch)
    return feats, bos, eos, tokens, lens, lens


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    with open(args.config, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, {"output_folder": "/tmp/gate_overhead"})
    torch.manual_seed(0)
    plain = build_from_arch(hparams["arch"]).train()
    gated = insert_gates(
        copy.deepcopy(plain),
        sites=hparams["gate_sites"],
        init_retention=hparams["gate_init_retention"],
        temperature=hparams["gate_temperature"],
        hard=hparams["gate_hard"],
        threshold=hparams["gate_threshold"],
    ).train()
    batch = random_batch(args, hparams["arch"]["vocab_size"])
    times = interleaved_medians(
        {
            "plain": make_step(plain, batch),
            "gated": make_step(gated, batch, hparams["regulariser"]),
        },
        repeats=args.repeats,
    )
    report = {
        "config": args.config,
        "batch": f"{args.batch} x {args.seconds:.1f} s",
        "plain_step_seconds": round(times["plain"], 4),
        "gated_step_seconds": round(times["gated"], 4),
        "gated_over_plain": round(times["gated"] / times["plain"], 3),
        "machine": machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
