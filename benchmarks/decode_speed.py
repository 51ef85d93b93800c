#!/usr/bin/env python3
"""The speed table: dense against shrunk, float against int8, TorchScript and ONNX, by search.

    python benchmarks/decode_speed.py --dense results/conformer_dense_mini/1986/compact \
        --compact results/conformer_adrop_mini/1986/compact --data-folder corpus \
        --out speed.json --markdown speed.md

Both folders are inference folders written by `conformer-prune shrink` (on a dense run it
writes the dense model in the same compact modules, every unit kept, so that both run the same
code). Every row is one way to run a model; for each, in this one
process and at one thread count:
- real-time factor (seconds of compute per second of audio) of the full decode (waveform to
  tokens) and of the encoder alone (waveform to encoder states), at batch 1 (the timing
  utterances one at a time) and batch 16 (the same utterances as one padded batch); timings
  alternate between rows (median of --repeats, --encode-repeats for the encoder, which is timed
  once per model variant) so that a change of machine load hits all alike;
- WER of the row's decode over the whole split (batch 16; the exported rows at batch 1).
The TorchScript encoder is traced at batch 1 without a padding mask (conformer_prune/export.py),
and the ONNX one (run by onnxruntime, from the filterbanks that SpeechBrain's Fbank computes in
the row's time) is exported alike, so they have no batch-16 column.
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch
from speechbrain.decoders import S2STransformerBeamSearcher

from common import csv_batch, flops, interleaved_medians, machine, write_report
from conformer_prune.decode import FolderDecoder
from conformer_prune.export import export_onnx, onnx_session, quantize_onnx, trace_encoder
from conformer_prune.model import count_params, load_weights
from conformer_prune.prepare import prepare_librispeech

# (row name, model, search, int8, encoder): encoder "eager", "torchscript", "onnx", "onnx_int8"
# (onnxruntime's dynamic int8 of the ONNX graph; the PyTorch model stays float) or "uncached"
# (the eager encoder with SpeechBrain's own S2STransformerBeamSearcher, no decoder cache).
ROWS = [
    ("dense, joint search, SpeechBrain's searcher", "dense", "joint", False, "uncached"),
    ("dense, joint search", "dense", "joint", False, "eager"),
    ("shrunk, joint search", "shrunk", "joint", False, "eager"),
    ("dense int8, joint search", "dense", "joint", True, "eager"),
    ("shrunk int8, joint search", "shrunk", "joint", True, "eager"),
    ("dense TorchScript encoder, joint search", "dense", "joint", False, "torchscript"),
    ("shrunk TorchScript encoder, joint search", "shrunk", "joint", False, "torchscript"),
    ("dense ONNX encoder (onnxruntime), joint search", "dense", "joint", False, "onnx"),
    ("shrunk ONNX encoder (onnxruntime), joint search", "shrunk", "joint", False, "onnx"),
    ("dense, rescore search", "dense", "rescore", False, "eager"),
    ("shrunk, rescore search", "shrunk", "rescore", False, "eager"),
    ("dense, greedy CTC", "dense", "greedy", False, "eager"),
    ("shrunk, greedy CTC", "shrunk", "greedy", False, "eager"),
    ("shrunk int8, greedy CTC", "shrunk", "greedy", True, "eager"),
    ("dense ONNX int8 encoder (onnxruntime), joint search", "dense", "joint", False, "onnx_int8"),
    ("shrunk ONNX int8 encoder (onnxruntime), joint search", "shrunk", "joint", False,
     "onnx_int8"),
]
EXPORTED = ("torchscript", "onnx", "onnx_int8")  # batch 1 only


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="inference folder of the dense model")
    parser.add_argument("--compact", required=True, help="inference folder of the shrunk model")
    parser.add_argument("--data-folder", required=True)
    parser.add_argument("--split", default="test-clean")
    parser.add_argument("--utterances", type=int, default=16, help="timing utterances")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed full decodes per row")
    parser.add_argument("--encode-repeats", type=int, default=15,
                        help="timed encoder passes per row (cheap, and noisier)")
    parser.add_argument("--rows", help="comma-separated row numbers (1-based) to run")
    parser.add_argument("--out", help="also write the report as JSON here")
    parser.add_argument("--markdown", help="also write the table as markdown here")
    return parser.parse_args()


class Row:
    """One way to run a model: its FolderDecoder and what the timing calls."""

    def __init__(self, name, folder, search, int8, encoder, scratch, threads):
        self.name, self.encoder_kind = name, encoder
        # Rows whose encoders compute the same thing (SpeechBrain's searcher changes only the
        # search) share one encoder timing.
        self.encoder_key = (folder, int8, encoder if encoder in EXPORTED else "eager")
        self.decoder = FolderDecoder(folder, batch_size=16, search=search, int8=int8,
                                     output_folder=scratch)
        self.asr = self.decoder.asr
        if encoder == "uncached":
            # Same settings and attributes; only the decoder step differs (no cache).
            self.asr.mods.decoder.__class__ = S2STransformerBeamSearcher
        self.traced = None
        if encoder == "torchscript":
            self.traced, _ = trace_encoder(self.asr, self.asr.hparams.sample_rate)
            traced = self.traced
            # Batch 1 only: the trace has no padding mask.
            self.asr.encode_batch = lambda wavs, wav_lens: traced(wavs)[0]
            self.decoder.batch_size = 1
        if encoder in ("onnx", "onnx_int8"):
            path = Path(scratch) / "encoder.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(self.asr, path, self.asr.hparams.sample_rate)
            if encoder == "onnx_int8":
                quantize_onnx(path, path.with_name("encoder_int8.onnx"),
                              self.asr.hparams.sample_rate, self.asr)
                path = path.with_name("encoder_int8.onnx")
            session, fbank = onnx_session(path, threads), self.asr.hparams.compute_features
            self.asr.encode_batch = lambda wavs, wav_lens: torch.from_numpy(
                session.run(None, {"filterbanks": fbank(wavs).numpy()})[0])
            self.decoder.batch_size = 1  # exported at batch 1, as the trace

    def encode(self, wavs, lens):
        with torch.no_grad():
            return self.asr.encode_batch(wavs, lens)

    def decode(self, wavs, lens):
        return self.asr.transcribe_with_greedy(wavs, lens)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    scratch = Path(args.compact) / "speed"
    csv_path = prepare_librispeech(args.data_folder, scratch / "data", splits=(args.split,),
                                   progress=False)[args.split]
    signals, wavs, lens, audio = csv_batch(csv_path, args.utterances, spread=True)
    folders = {"dense": args.dense, "shrunk": args.compact}
    chosen = ROWS if not args.rows else [ROWS[int(i) - 1] for i in args.rows.split(",")]
    rows = [Row(name, folders[model], search, int8, encoder, scratch / f"row{i}", args.threads)
            for i, (name, model, search, int8, encoder) in enumerate(chosen)]
    ones = torch.ones(1)

    def one_by_one(function):
        return lambda: [function(signal.unsqueeze(0), ones) for signal in signals]

    timed = {}
    for stage in ("encode", "decode"):
        calls = {}
        for row in rows:
            # The encoder is timed once per model variant; its rows share the number.
            key = row.encoder_key if stage == "encode" else row.name
            if (key, 1) in calls:
                continue
            call = getattr(row, stage)
            calls[(key, 1)] = one_by_one(call)
            if row.encoder_kind not in EXPORTED:
                calls[(key, 16)] = lambda call=call: call(wavs, lens)
        repeats = args.encode_repeats if stage == "encode" else args.repeats
        timed[stage] = interleaved_medians(calls, repeats)
        print(f"timed {stage}", file=sys.stderr)

    # The encoders' FLOPs at batch 1 (the eager model of each row's folder; an exported
    # encoder computes the same), so that a speed-up can be read against its FLOP reduction.
    encoder_gflops = {}
    for (_, model, _, _, _), row in zip(chosen, rows):
        if model not in encoder_gflops:
            encode = row.asr.mods.encoder  # what encode_batch runs, before any export
            encoder_gflops[model] = round(sum(
                flops(lambda s=signal: encode(s.unsqueeze(0), ones)) for signal in signals)
                / 1e9, 2)

    report = {"split": args.split, "timing_utterances": len(signals),
              "timing_audio_seconds": round(audio, 2), "threads": args.threads,
              "machine": machine(), "rows": []}
    for (name, model, search, int8, encoder), row in zip(chosen, rows):
        data = row.decoder.datasets(args.data_folder, [args.split], scratch / "data")
        scores = row.decoder.score_split(args.split, data[args.split])
        params = count_params(load_weights(Path(folders[model]) / "model.ckpt"))
        entry = {"row": name, "model": model, "search": search, "int8": int8,
                 "encoder": encoder, "encoder_params": params["encoder"],
                 "total_params": params["total"], "encoder_gflops_batch1": encoder_gflops[model],
                 "wer": round(scores["wer"], 2),
                 "ctc_greedy_wer": round(scores["ctc_greedy_wer"], 2)}
        for stage in ("decode", "encode"):
            for batch in (1, 16):
                key = row.encoder_key if stage == "encode" else name
                seconds = timed[stage].get((key, batch))
                entry[f"{stage}_rtf_batch{batch}"] = (
                    None if seconds is None else round(seconds / audio, 5))
        report["rows"].append(entry)
        print(f"scored {name}: WER {entry['wer']}", file=sys.stderr)
    add_ratios(report)
    write_report(report, args.out)
    if args.markdown:
        Path(args.markdown).write_text(markdown(report), encoding="utf-8")


def add_ratios(report):
    """Speed-ups of the shrunk rows over the dense row with the same search, int8 and encoder
    kind (or, failing that, the same search), each as dense time / shrunk time."""
    rows = report["rows"]
    for row in rows:
        if row["model"] != "shrunk":
            continue
        same = [d for d in rows if d["model"] == "dense" and d["search"] == row["search"]
                and d["int8"] == row["int8"] and d["encoder"] == row["encoder"]]
        same = same or [d for d in rows if d["model"] == "dense" and d["search"] == row["search"]
                        and d["encoder"] == "eager" and not d["int8"]]
        if not same:
            continue
        dense = same[0]
        row["versus"] = dense["row"]
        for key in ("decode_rtf_batch1", "decode_rtf_batch16", "encode_rtf_batch1",
                    "encode_rtf_batch16"):
            if row[key] and dense[key]:
                row[f"speedup_{key.replace('_rtf', '')}"] = round(dense[key] / row[key], 2)


def markdown(report):
    """The table as markdown, machine and thread count above it."""
    m = report["machine"]
    lines = [f"Measured on {m['cpu']} ({m['cores']} cores), {report['threads']} torch thread(s), "
             f"torch {m['torch']}; timing: {report['timing_utterances']} {report['split']} "
             f"utterances ({report['timing_audio_seconds']} s of audio); WER: all of "
             f"{report['split']}. RTF = compute seconds per audio second.", "",
             "| row | encoder params | encoder GFLOPs b1 | WER | decode RTF b1 | decode RTF b16 "
             "| encoder RTF b1 | encoder RTF b16 | decode speed-up b1 / b16 "
             "| encoder speed-up b1 / b16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    def speedups(row, stage):
        if "versus" not in row:
            return ""
        return " / ".join(f"{row[key]}x" if key in row else "-"
                          for key in (f"speedup_{stage}_batch1", f"speedup_{stage}_batch16"))

    for row in report["rows"]:
        lines.append(f"| {row['row']} | {row['encoder_params']:,} | "
                     f"{row.get('encoder_gflops_batch1', '-')} | {row['wer']:.2f} | "
                     f"{cell(row['decode_rtf_batch1'])} | {cell(row['decode_rtf_batch16'])} | "
                     f"{cell(row['encode_rtf_batch1'])} | {cell(row['encode_rtf_batch16'])} | "
                     f"{speedups(row, 'decode')} | {speedups(row, 'encode')} |")
    lines.append("")
    lines.append("Speed-ups: the dense row with the same search and encoder (eager, TorchScript, "
                 "ONNX; int8 or not) over the shrunk row. GFLOPs: the eager encoder's, by torch's "
                 "FlopCounterMode, over the timing utterances one at a time.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
