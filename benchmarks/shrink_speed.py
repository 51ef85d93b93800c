#!/usr/bin/env python3
"""Dense against shrunk: encoder forward time, FLOPs and full decode speed, in one process.

    python benchmarks/shrink_speed.py --dense results/conformer_dense_mini/1986 \
        --compact results/conformer_adrop_mini/1986/compact --data-folder corpus

The dense model is the dense run's last checkpoint; the shrunk model is the compact folder;
with `--gated RUN`, the gated run it was shrunk from is timed too (eval mode, masks applied).
Gated and shrunk decode to the same hypotheses, so their decode ratio is the shrink's own
speedup; the dense model's hypotheses (and so its beam search's work) differ.
Both encode the same batch of real test-clean utterances (CNN front end and Conformer encoder,
on filterbanks computed beforehand: their FFT is work the FLOP counter does not see) at a fixed
thread count; measurements alternate between the models so
that a change of machine load hits both alike. FLOPs come from torch's FlopCounterMode on the
same batch. The full decode (features, encoder and joint CTC/attention beam search with the
same settings) is timed over the same utterances and given as real-time factor.
Target: speedup at least 0.8 times the FLOP reduction.
"""

import argparse
from pathlib import Path

import torch
from speechbrain.decoders import S2STransformerBeamSearcher
from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization

from common import csv_batch, flops, interleaved_medians, machine, write_report
from conformer_prune.decode import load_inference_folder
from conformer_prune.model import count_params, param_state
from conformer_prune.prepare import prepare_librispeech
from conformer_prune.shrink import load_gated_run


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="the dense run folder")
    parser.add_argument("--compact", required=True, help="the compact (shrunk) model folder")
    parser.add_argument("--gated", help="the gated run the compact folder was shrunk from")
    parser.add_argument("--data-folder", required=True)
    parser.add_argument("--split", default="test-clean")
    parser.add_argument("--utterances", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the report as JSON here")
    return parser.parse_args()


def load_batch(data_folder, split, count, work_dir):
    """The first `count` utterances of the split as one padded batch, and their audio seconds."""
    csv_path = prepare_librispeech(data_folder, work_dir, splits=(split,), progress=False)[split]
    _, wavs, lens, seconds = csv_batch(csv_path, count)
    return wavs, lens, seconds


def dense_model(run_dir):
    run = load_gated_run(run_dir)
    normalize = InputNormalization(norm_type="global")
    normalize._load(run["normalizer"])
    return run["modules"].eval(), normalize.eval(), run["hparams"]


def searcher(asr, opts):
    scorer = ScorerBuilder(
        full_scorers=[],
        partial_scorers=[CTCScorer(asr.ctc_lin, opts["blank_index"], opts["eos_index"])],
        weights={"ctc": opts["ctc_weight"]},
    )
    return S2STransformerBeamSearcher(
        modules=[asr.Transformer, asr.seq_lin],
        bos_index=opts["bos_index"],
        eos_index=opts["eos_index"],
        min_decode_ratio=0.0,
        max_decode_ratio=opts["max_decode_ratio"],
        beam_size=opts["beam_size"],
        using_eos_threshold=False,
        length_normalization=True,
        scorer=scorer,
    )


def encoder(asr, feats):
    """The timed and counted work: front end and encoder on fixed features."""
    def encode(lens):
        return asr.Transformer.encode(asr.CNN(feats), lens)

    return encode


def full_decoder(asr, normalize, features, search):
    """The whole decode of a batch: features, encoder and beam search."""
    def decode(wavs, lens):
        return search(encoder(asr, normalize(features(wavs), lens))(lens), lens)

    return decode


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    dense, dense_norm, dense_hparams = dense_model(args.dense)
    inference = vars(load_inference_folder(args.compact).hparams)
    models = {"dense": (dense, dense_norm)}
    if args.gated:
        gated, gated_norm, _ = dense_model(args.gated)
        models["gated"] = (gated, gated_norm)
    models["shrunk"] = (inference["asr"].eval(), inference["normalize"].eval())
    wavs, lens, audio_seconds = load_batch(
        args.data_folder, args.split, args.utterances, Path(args.compact) / "benchmark_data"
    )
    features = Fbank(n_mels=dense_hparams["arch"].get("n_mels", 80))
    with torch.no_grad():
        feats = {name: norm(features(wavs), lens) for name, (_, norm) in models.items()}
    encode = {name: encoder(asr, feats[name]) for name, (asr, _) in models.items()}
    opts = {key: inference[key] for key in ("bos_index", "eos_index", "blank_index",
                                            "beam_size", "ctc_weight")}
    opts["max_decode_ratio"] = 1.0
    decode = {name: full_decoder(asr, norm, features, searcher(asr, opts))
              for name, (asr, norm) in models.items()}

    # FlopCounterMode tracks modules through autograd hooks: count outside no_grad.
    encoder_flops = {name: flops(f, lens) for name, f in encode.items()}
    with torch.no_grad():
        encode_times = interleaved_medians(
            {name: (lambda f=f: f(lens)) for name, f in encode.items()}, args.repeats
        )
        decode_times = interleaved_medians(
            {name: (lambda f=f: f(wavs, lens)) for name, f in decode.items()},
            repeats=max(1, args.repeats // 2),
        )
    params = {name: count_params(param_state(asr)) for name, (asr, _) in models.items()}
    report = {
        "batch": f"{len(wavs)} {args.split} utterances, {audio_seconds:.1f} s of audio",
        "threads": args.threads,
        "encoder_params": {name: p["encoder"] for name, p in params.items()},
        "total_params": {name: p["total"] for name, p in params.items()},
        "encoder_seconds": {k: round(v, 4) for k, v in encode_times.items()},
        "encoder_gflops": {k: round(v / 1e9, 3) for k, v in encoder_flops.items()},
        "encoder_speedup": round(encode_times["dense"] / encode_times["shrunk"], 3),
        "encoder_flop_reduction": round(encoder_flops["dense"] / encoder_flops["shrunk"], 3),
        "decode_rtf": {k: round(v / audio_seconds, 4) for k, v in decode_times.items()},
        "decode_speedup": round(decode_times["dense"] / decode_times["shrunk"], 3),
        "machine": machine(),
    }
    if "gated" in models:
        report["decode_speedup_over_gated"] = round(
            decode_times["gated"] / decode_times["shrunk"], 3)
    report["speedup_over_flop_reduction"] = round(
        report["encoder_speedup"] / report["encoder_flop_reduction"], 3
    )
    write_report(report, args.out)


if __name__ == "__main__":
    main()
