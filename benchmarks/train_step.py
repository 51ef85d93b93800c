#!/usr/bin/env python3
"""Training step time of the mini recipe's model under two levers, in one process (issue 15).

    python benchmarks/train_step.py --data-folder corpus

Levers: filterbanks computed in every step (what the recipe does) or computed once and cached
(a step then starts from the features); fp32 or bf16 autocast (SpeechBrain's `--precision
bf16`, which on CPU pays off only with bf16 matrix units: avx512_bf16 or AMX, reported).
Each step is the recipe's: features, global normalisation, the Conformer CTC/attention
forward, the joint loss, backward, Adam. The batches are real train utterances in the
recipe's batch size (about 40 s of audio each, neighbours by length as the recipe's buckets
make them); the four variants alternate so that a change of machine load hits all alike, and
the medians are compared. Speed only: what bf16 does to WER needs a training run.
"""

import argparse
import csv
import tempfile
from pathlib import Path

import torch
from speechbrain.dataio.dataio import read_audio
from speechbrain.lobes.features import Fbank
from speechbrain.nnet.losses import ctc_loss, kldiv_loss
from speechbrain.processing.features import InputNormalization

from common import interleaved_medians, machine, write_report
from conformer_prune.model import build_asr_modules
from conformer_prune.prepare import prepare_librispeech
from conformer_prune.shrink import plain_hparams

MINI_YAML = Path(__file__).resolve().parent.parent / "hparams/mini/conformer_dense.yaml"


def mini_arch():
    """The mini recipe's architecture, read from its YAML (its !ref entries filled in)."""
    hparams = plain_hparams(MINI_YAML)
    return {**hparams["arch"], "vocab_size": hparams["output_neurons"],
            "n_mels": hparams["n_mels"]}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-folder", required=True)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches timed")
    parser.add_argument("--batch-seconds", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=1, help="the recipe's: one per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the report as JSON here")
    return parser.parse_args()


def load_batches(data_folder, count, seconds):
    """`count` batches of neighbouring train utterances by length, about `seconds` each:
    (padded waveforms, relative lengths, character targets)."""
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = prepare_librispeech(data_folder, tmp, splits=("train-clean-100",),
                                       progress=False)["train-clean-100"]
        with open(csv_path, encoding="utf-8") as f:
            rows = sorted(csv.DictReader(f), key=lambda r: float(r["duration"]))
    batches = []
    stride = max(1, len(rows) // count)
    for i in range(count):
        picked, total, j = [], 0.0, i * stride
        while j < len(rows) and total < seconds:
            picked.append(rows[j])
            total += float(rows[j]["duration"])
            j += 1
        signals = [read_audio(row["wav"]) for row in picked]
        longest = max(len(s) for s in signals)
        wavs = torch.stack([torch.nn.functional.pad(s, (0, longest - len(s))) for s in signals])
        lens = torch.tensor([len(s) / longest for s in signals])
        batches.append((wavs, lens, len(picked), total,
                        min(float(row["duration"]) for row in picked)))
    return batches


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_asr_modules(**mini_arch())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    fbank, normalize = Fbank(n_mels=80), InputNormalization(norm_type="global")
    batches = load_batches(args.data_folder, args.batches, args.batch_seconds)
    with torch.no_grad():
        cached = [normalize(fbank(wavs), lens) for wavs, lens, *_ in batches]
    normalize.eval()  # the statistics stay as they are: every variant normalises alike
    # Random characters, about 8 per second of the shortest utterance (speech is ~12-15):
    # targets CTC can align in every utterance of the batch.
    tokens = [torch.randint(3, 30, (n, max(4, int(8 * shortest))))
              for _, _, n, _, shortest in batches]
    token_lens = [torch.ones(len(t)) for t in tokens]

    def step(index, cache, bf16):
        wavs, lens, *_ = batches[index]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            feats = cached[index] if cache else normalize(fbank(wavs), lens)
            _, ctc_logits, seq_logits = model(feats, tokens[index], lens)
        loss = 0.7 * ctc_loss(ctc_logits.float().log_softmax(-1), tokens[index], lens,
                              token_lens[index], blank_index=0) + \
            0.3 * kldiv_loss(seq_logits.float().log_softmax(-1), tokens[index],
                             length=token_lens[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def epoch_of(cache, bf16):
        return lambda: [step(i, cache, bf16) for i in range(len(batches))]

    variants = {"computed_fp32": epoch_of(False, False), "cached_fp32": epoch_of(True, False),
                "computed_bf16": epoch_of(False, True), "cached_bf16": epoch_of(True, True)}
    medians = interleaved_medians(variants, args.repeats)
    per_step = {name: seconds / len(batches) for name, seconds in medians.items()}
    base = per_step["computed_fp32"]
    flags = cpu_flags()
    write_report({
        "machine": {**machine(), "avx512_bf16": "avx512_bf16" in flags,
                    "amx_bf16": "amx_bf16" in flags},
        "batches": [{"utterances": n, "audio_seconds": round(s, 1)}
                    for _, _, n, s, _ in batches],
        "seconds_per_step": {k: round(v, 4) for k, v in per_step.items()},
        "speedup_vs_computed_fp32": {k: round(base / v, 3) for k, v in per_step.items()},
        "note": "medians over repeats of every batch; speed only, not WER",
    }, args.out)


def cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return info.read()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
