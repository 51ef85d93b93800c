#!/usr/bin/env python3
"""Where the joint search's decode time goes: encoder, attention decoder, CTC prefix scorer.

    python benchmarks/decode_profile.py results/conformer_adrop_mini/1986/compact \
        --data-folder corpus [--uncached]

Decodes a batch of 16 utterances spread over the split once under cProfile and prints the
cumulative seconds of the encoder (`encode_batch`), of the attention decoder's steps (the
searcher's `forward_step`) and of the CTC prefix scorer (`CTCPrefixScore.forward_step`), and
the rest of the beam search (its bookkeeping: top-k, permutations, end checks). `--uncached`
runs SpeechBrain's own S2STransformerBeamSearcher instead of the cached one.
"""

import argparse
import cProfile
import pstats
import warnings
from pathlib import Path

import torch
from speechbrain.decoders import S2STransformerBeamSearcher

from common import csv_batch, machine, write_report
from conformer_prune.inference import load_compact_asr
from conformer_prune.prepare import prepare_librispeech

PARTS = {  # (file name ending, function name) of each part in cProfile's table
    "encoder": ("ASR.py", "encode_batch"),
    "decoder_steps": ("", "forward_step"),
    "ctc_prefix_scorer": ("ctc.py", "forward_step"),
}


def cumulative(stats, suffix, function):
    """Cumulative seconds of the functions named `function` in files ending with `suffix`."""
    return sum(entry[3] for (path, _, name), entry in stats.stats.items()
               if name == function and path.endswith(suffix)
               and not (suffix == "" and path.endswith("ctc.py")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--data-folder", required=True)
    parser.add_argument("--split", default="test-clean")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--uncached", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    csv_path = prepare_librispeech(args.data_folder, Path(args.model_dir) / "speed" / "data",
                                   splits=(args.split,), progress=False)[args.split]
    _, wavs, lens, audio = csv_batch(csv_path, 16, spread=True)
    asr = load_compact_asr(args.model_dir)
    if args.uncached:
        asr.mods.decoder.__class__ = S2STransformerBeamSearcher  # same settings, no cache
    asr.transcribe_batch(wavs, lens)  # warm-up
    profile = cProfile.Profile()
    profile.enable()
    asr.transcribe_batch(wavs, lens)
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_tt
    parts = {part: cumulative(stats, *where) for part, where in PARTS.items()}
    # The searcher's forward_step includes no scorer time; the scorer is called beside it.
    parts["rest_of_search"] = total - sum(parts.values())
    write_report({
        "model": args.model_dir, "searcher": "SpeechBrain" if args.uncached else "cached",
        "audio_seconds": round(audio, 2), "total_seconds": round(total, 3),
        "seconds": {k: round(v, 3) for k, v in parts.items()},
        "share": {k: round(v / total, 3) for k, v in parts.items()},
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
