#!/usr/bin/env python3
"""Unstructured against structured: encoder forward time of a sparse model with dense and with
sparse kernels, against the dense model and the shrunk adaptive dropout model, in one process.

    python benchmarks/sparse_speed.py --dense results/conformer_dense_mini/1986 \
        --sparse results/conformer_seven_mini_keep30/1986 \
        --compact results/conformer_adrop_mini/1986/compact --data-folder corpus

- dense: the dense run's last checkpoint.
- sparse, dense kernels: the unstructured run's last checkpoint (full-size tensors with exact
  zeros) run as it is: the zeros are multiplied like any other number.
- sparse, sparse kernels: the same weights, every torch.nn.Linear of the encoder layers (both
  FFNs, the attention output and position projections, the convolution module's last linear)
  computed with a CSR weight and torch.sparse.mm. The attention input projection
  (RelPosMHAXL's in_proj_weight, used through F.linear) and the convolutions stay dense; the
  report gives the share of the non-zero encoder-layer weights that ran on sparse kernels.
- shrunk: the compact folder of adaptive dropout (smaller dense matrices).
All encode the same batch of real test utterances (CNN front end and Conformer encoder on
filterbanks computed beforehand), timed in alternation at a fixed thread count; the sparse
models' outputs are checked equal (up to float rounding) before timing.
"""

import argparse
import warnings
from pathlib import Path

import torch
from speechbrain.lobes.features import Fbank

from common import interleaved_medians, machine, write_report
from conformer_prune.decode import load_inference_folder
from conformer_prune.model import count_params, param_state
from conformer_prune.sites import encoder_layers
from shrink_speed import dense_model, encoder, load_batch


class CSRLinear(torch.nn.Module):
    """y = x W^T + b with W held in CSR form (torch.sparse.mm)."""

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.out_features = linear.out_features

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def with_sparse_kernels(asr):
    """The model with every torch.nn.Linear of its encoder layers replaced by CSRLinear; returns
    (model, non-zero weights moved to sparse kernels, non-zero weights of the encoder layers)."""
    total = sum(int(torch.count_nonzero(p)) for layer in encoder_layers(asr)
                for p in layer.parameters() if p.dim() >= 2)
    moved = 0
    for layer in encoder_layers(asr):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    moved += int(torch.count_nonzero(child.weight))
                    setattr(parent, name, CSRLinear(child))
    return asr, moved, total


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="the dense run folder")
    parser.add_argument("--sparse", required=True, help="an unstructured (sparse) run folder")
    parser.add_argument("--compact", required=True, help="the shrunk adaptive dropout folder")
    parser.add_argument("--data-folder", required=True)
    parser.add_argument("--split", default="test-clean")
    parser.add_argument("--utterances", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="also write the report as JSON here")
    return parser.parse_args()


def main():
    args = parse_args()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.set_num_threads(args.threads)
    dense, dense_norm, hparams = dense_model(args.dense)
    sparse, sparse_norm, _ = dense_model(args.sparse)
    sparse_kernels, moved, nonzero = with_sparse_kernels(dense_model(args.sparse)[0])
    inference = vars(load_inference_folder(args.compact).hparams)
    models = {
        "dense": (dense, dense_norm),
        "sparse_dense_kernels": (sparse, sparse_norm),
        "sparse_sparse_kernels": (sparse_kernels, sparse_norm),
        "adrop_shrunk": (inference["asr"].eval(), inference["normalize"].eval()),
    }
    wavs, lens, audio_seconds = load_batch(args.data_folder, args.split, args.utterances,
                                           Path(args.sparse) / "benchmark_data")
    features = Fbank(n_mels=hparams["arch"].get("n_mels", 80))
    with torch.no_grad():
        feats = {name: norm(features(wavs), lens) for name, (_, norm) in models.items()}
        encode = {name: encoder(asr, feats[name]) for name, (asr, _) in models.items()}
        same = torch.allclose(encode["sparse_dense_kernels"](lens),
                              encode["sparse_sparse_kernels"](lens), atol=1e-4, rtol=1e-4)
        if not same:
            raise SystemExit("sparse kernels changed the encoder output: not a fair timing")
        times = interleaved_medians({name: (lambda f=f: f(lens)) for name, f in encode.items()},
                                    args.repeats)
    params = {name: count_params(param_state(asr)) for name, (asr, _) in models.items()
              if name != "sparse_sparse_kernels"}
    report = {
        "batch": f"{len(wavs)} {args.split} utterances, {audio_seconds:.1f} s of audio",
        "threads": args.threads,
        "encoder_params": {name: p["encoder"] for name, p in params.items()},
        "encoder_nonzero": {name: p["encoder_nonzero"] for name, p in params.items()},
        "encoder_seconds": {name: round(t, 4) for name, t in times.items()},
        "speed_vs_dense": {name: round(times["dense"] / t, 3) for name, t in times.items()},
        "sparse_kernels_cover": round(moved / max(1, nonzero), 3),
        "machine": machine(),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
