"""`conformer-prune export`: a compact folder's encoder as TorchScript (float, int8) and ONNX.

The TorchScript module takes a waveform (1, samples) at the folder's sample rate and returns the
encoder states (1, frames, d_model) and the CTC head's log-probabilities (1, frames, outputs):
filterbanks, normalisation, CNN front end and Conformer encoder in one file that runs without
SpeechBrain or this package (`torch.jit.load`). Greedy CTC decoding is an argmax away; the
joint beam search stays in Python (`inference.CompactASR`), fed with the exported encoder's
states.

It is a trace at batch 1 without a padding mask (one utterance has no padding), so any length
works: the export is checked against the eager model on a signal of another length than the
one it was traced on, and the largest difference is written to export.json.

The ONNX file (`encoder.onnx`, for onnxruntime and other ONNX runtimes) starts one step later,
at the filterbanks (1, frames, n_mels) of SpeechBrain's Fbank with the folder's settings
(`hyperparams.yaml`: `compute_features`): neither of torch's ONNX exporters exports torch.stft
here. It is checked the same way, in onnxruntime, on another number of frames.

int8: `inference.quantize_int8`, PyTorch's dynamic quantisation of the encoder's Linear layers
(`encoder_int8.ts`), and onnxruntime's dynamic quantisation of the ONNX graph's MatMul weights
(`encoder_int8.onnx`; `quantize_onnx`). Both are approximations: their difference from the
float model is recorded, not bounded, and the speed benchmark gives their WER.
"""

import json
import time
import warnings
from pathlib import Path

import torch

from conformer_prune.decode import load_inference_folder
from conformer_prune.errors import InputError

EXPORT_FILES = {"float": "encoder.ts", "int8": "encoder_int8.ts", "onnx": "encoder.onnx",
                "onnx_int8": "encoder_int8.onnx"}
TRACE_SECONDS, CHECK_SECONDS = 3.0, 4.7


class FilterbankEncoder(torch.nn.Module):
    """filterbanks (1, frames, n_mels) -> (encoder states, CTC log-probabilities) of a
    CompactASR: the ONNX export's module, and ExportableEncoder after its filterbanks."""

    def __init__(self, asr):
        super().__init__()
        hparams = asr.hparams
        self.normalize = hparams.normalize
        self.cnn = hparams.asr.CNN
        self.transformer = hparams.asr.Transformer
        self.ctc_lin = hparams.asr.ctc_lin

    def forward(self, feats):
        feats = self.normalize(feats, torch.ones(feats.shape[0]))
        states = self.transformer.encode(self.cnn(feats), None)
        return states, torch.log_softmax(self.ctc_lin(states), dim=-1)


class ExportableEncoder(torch.nn.Module):
    """waveform (1, samples) -> (encoder states, CTC log-probabilities) of a CompactASR."""

    def __init__(self, asr):
        super().__init__()
        self.compute_features = asr.hparams.compute_features
        self.from_filterbanks = FilterbankEncoder(asr)

    def forward(self, wav):
        return self.from_filterbanks(self.compute_features(wav))


def _probe_signals(sample_rate):
    """(signal to export on, signal of another length to check on): the same every export."""
    generator = torch.Generator().manual_seed(0)
    return tuple(0.1 * torch.randn(1, int(seconds * sample_rate), generator=generator)
                 for seconds in (TRACE_SECONDS, CHECK_SECONDS))


def _largest_difference(outputs, reference):
    return max(float((torch.as_tensor(a) - b).abs().max()) for a, b in zip(outputs, reference))


def trace_encoder(asr, sample_rate):
    """(traced module, largest |traced - eager| on a signal of another length)."""
    module = ExportableEncoder(asr).eval()
    traced_on, check = _probe_signals(sample_rate)
    with torch.no_grad():
        traced = torch.jit.trace(module, (traced_on,), check_trace=False)
        return traced, _largest_difference(traced(check), module(check))


def onnx_session(path, threads=1):
    """An onnxruntime CPU session of an exported encoder.onnx."""
    try:
        import onnxruntime
    except ImportError:
        raise InputError("ONNX export needs the onnx and onnxruntime packages "
                         "(recipes/setup.sh installs them; or pass --no-onnx)") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(asr, path, sample_rate):
    """Writes encoder.onnx; returns the largest |onnxruntime - eager| on another length."""
    module = FilterbankEncoder(asr).eval()
    traced_on, check = (asr.hparams.compute_features(signal)
                        for signal in _probe_signals(sample_rate))
    frames = {1: "frames"}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter: torch.export's (dynamo=True) took 12 minutes on the
        # mini model here and wrote a graph that onnxruntime refused to load. Its warnings
        # (constant folding of Slice, a Squeeze on a fixed dimension) are about static shapes.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (traced_on,), str(path), dynamo=False, opset_version=17,
                          input_names=["filterbanks"], output_names=["states", "ctc_log_probs"],
                          dynamic_axes={"filterbanks": frames, "states": frames,
                                        "ctc_log_probs": frames})
        eager = module(check)
    return _largest_difference(onnx_session(path).run(None, {"filterbanks": check.numpy()}),
                               eager)


def quantize_onnx(float_path, int8_path, sample_rate, asr):
    """Writes onnxruntime's dynamic int8 quantisation of encoder.onnx (weights of MatMul and
    Gemm nodes stored as int8, activations quantised per call); returns the largest
    |int8 - eager float| on the check signal."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_path), str(int8_path), weight_type=QuantType.QInt8)
    check = asr.hparams.compute_features(_probe_signals(sample_rate)[1])
    with torch.no_grad():
        eager = FilterbankEncoder(asr).eval()(check)
    return _largest_difference(onnx_session(int8_path).run(None, {"filterbanks": check.numpy()}),
                               eager)


def export_folder(model_dir, out_dir=None, int8=True, tolerance=1e-3, onnx=True):
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
        if kind == "float":
            float_asr = asr  # the ONNX export below is of the same float model
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
    if onnx:
        started = time.perf_counter()
        path = out_dir / EXPORT_FILES["onnx"]
        difference = export_onnx(float_asr, path, float_asr.hparams.sample_rate)
        if difference > tolerance:
            raise InputError(f"{model_dir}: the ONNX encoder differs from the eager one by "
                             f"{difference:.3g} (> {tolerance}) on an untraced length")
        report["files"]["onnx"] = {"file": path.name, "bytes": path.stat().st_size,
                                   "input": "filterbanks (1, frames, n_mels), float32",
                                   "max_abs_difference_vs_eager": difference,
                                   "seconds": round(time.perf_counter() - started, 2)}
    if onnx and int8:
        started = time.perf_counter()
        int8_path = out_dir / EXPORT_FILES["onnx_int8"]
        difference = quantize_onnx(path, int8_path, float_asr.hparams.sample_rate, float_asr)
        report["files"]["onnx_int8"] = {
            "file": int8_path.name, "bytes": int8_path.stat().st_size,
            "input": "filterbanks (1, frames, n_mels), float32",
            "max_abs_difference_vs_eager": difference,
            "seconds": round(time.perf_counter() - started, 2)}
    (out_dir / "export.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "export", help="the compact model's encoder as TorchScript (float and int8) and ONNX",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a folder written by `conformer-prune shrink`")
    parser.add_argument("--out", help="output folder (default: the model folder)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 variants")
    parser.add_argument("--no-onnx", action="store_true", help="skip encoder.onnx")
    parser.set_defaults(func=run)
    return parser


def run(args):
    report = export_folder(args.model_dir, args.out, int8=not args.no_int8,
                           onnx=not args.no_onnx)
    for kind, entry in report["files"].items():
        print(f"{kind}: {entry['file']} ({entry['bytes']:,} bytes), largest difference from "
              f"the eager model {entry['max_abs_difference_vs_eager']:.2g}")
    return 0
