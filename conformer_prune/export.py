"""`conformer-prune export`: the encoder of a compact folder as TorchScript, float and int8.

The exported module takes a waveform (1, samples) at the folder's sample rate and returns the
encoder states (1, frames, d_model) and the CTC head's log-probabilities (1, frames, outputs):
filterbanks, normalisation, CNN front end and Conformer encoder in one file that runs without
SpeechBrain or this package (`torch.jit.load`). Greedy CTC decoding is an argmax away; the
joint beam search stays in Python (`inference.CompactASR`), fed with the exported encoder's
states.

It is a trace at batch 1 without a padding mask (one utterance has no padding), so any length
works: the export is checked against the eager model on a signal of another length than the
one it was traced on, and the largest difference is written to export.json.

int8: `inference.quantize_int8`, PyTorch's dynamic quantisation of the encoder's Linear layers.
"""

import json
import time
from pathlib import Path

import torch

from conformer_prune.decode import load_inference_folder
from conformer_prune.errors import InputError

EXPORT_FILES = {"float": "encoder.ts", "int8": "encoder_int8.ts"}
TRACE_SECONDS, CHECK_SECONDS = 3.0, 4.7


class ExportableEncoder(torch.nn.Module):
    """waveform (1, samples) -> (encoder states, CTC log-probabilities) of a CompactASR."""

    def __init__(self, asr):
        super().__init__()
        hparams = asr.hparams
        self.compute_features = hparams.compute_features
        self.normalize = hparams.normalize
        self.cnn = hparams.asr.CNN
        self.transformer = hparams.asr.Transformer
        self.ctc_lin = hparams.asr.ctc_lin

    def forward(self, wav):
        feats = self.normalize(self.compute_features(wav), torch.ones(wav.shape[0]))
        states = self.transformer.encode(self.cnn(feats), None)
        return states, torch.log_softmax(self.ctc_lin(states), dim=-1)


def trace_encoder(asr, sample_rate):
    """(traced module, largest |traced - eager| on a signal of another length)."""
    module = ExportableEncoder(asr).eval()
    generator = torch.Generator().manual_seed(0)
    traced_on = 0.1 * torch.randn(1, int(TRACE_SECONDS * sample_rate), generator=generator)
    check = 0.1 * torch.randn(1, int(CHECK_SECONDS * sample_rate), generator=generator)
    with torch.no_grad():
        traced = torch.jit.trace(module, (traced_on,), check_trace=False)
        eager_out, traced_out = module(check), traced(check)
    difference = max(float((a - b).abs().max()) for a, b in zip(eager_out, traced_out))
    return traced, difference


def export_folder(model_dir, out_dir=None, int8=True, tolerance=1e-3):
    """Writes encoder.ts (and encoder_int8.ts) and export.json into out_dir (default: the
    model folder); returns the export.json content."""
    model_dir = Path(model_dir)
    out_dir = Path(out_dir or model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = ["float", "int8"] if int8 else ["float"]
    report = {"source": str(model_dir), "input": "waveform (1, samples), float32",
              "outputs": ["encoder states (1, frames, d_model)",
                          "CTC log-probabilities (1, frames, outputs)"],
              "torch": torch.__version__, "files": {}}
    for kind in kinds:
        asr = load_inference_folder(model_dir, int8=kind == "int8")
        started = time.perf_counter()
        traced, difference = trace_encoder(asr, asr.hparams.sample_rate)
        if difference > tolerance:
            raise InputError(f"{model_dir}: the traced {kind} encoder differs from the eager "
                             f"one by {difference:.3g} (> {tolerance}) on an untraced length")
        path = out_dir / EXPORT_FILES[kind]
        traced.save(str(path))
        report["files"][kind] = {"file": path.name, "bytes": path.stat().st_size,
                                 "max_abs_difference_vs_eager": difference,
                                 "seconds": round(time.perf_counter() - started, 2)}
    (out_dir / "export.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "export", help="the compact model's encoder as TorchScript (float and int8)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a folder written by `conformer-prune shrink`")
    parser.add_argument("--out", help="output folder (default: the model folder)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 variant")
    parser.set_defaults(func=run)
    return parser


def run(args):
    report = export_folder(args.model_dir, args.out, int8=not args.no_int8)
    for kind, entry in report["files"].items():
        print(f"{kind}: {entry['file']} ({entry['bytes']:,} bytes), largest difference from "
              f"the eager model {entry['max_abs_difference_vs_eager']:.2g}")
    return 0
