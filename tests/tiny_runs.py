"""`python train.py <yaml>` (or torchrun) with a tiny model on the tiny built corpus (conftest.py),
as a user runs it: shared by the end-to-end and the reliability tests."""

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_ARCH = (
    "{vocab_size: 40, n_mels: 80, d_model: 32, nhead: 2, num_encoder_layers: 2, "
    "num_decoder_layers: 1, d_ffn: 64, kernel_size: 7, dropout: 0.1, activation: gelu, "
    "cnn_channels: [8, 8, 8]}"
)
# The same architecture as JSON (build_asr_modules keyword arguments).
TINY_ARCH_JSON = (
    '{"vocab_size": 40, "n_mels": 80, "d_model": 32, "nhead": 2, "num_encoder_layers": 2, '
    '"num_decoder_layers": 1, "d_ffn": 64, "kernel_size": 7, "dropout": 0.1, '
    '"activation": "gelu", "cnn_channels": [8, 8, 8]}'
)
# Batches of at most 8 s: about 20 optimiser steps per epoch on the tiny corpus.
SMALL_BATCHES = "{max_batch_length: 8, num_buckets: 4, shuffle: True, batch_ordering: random}"


# A tiny character LM (tests/conftest.py's `tiny_lm`): 40 outputs, as the tiny recognisers
TINY_LM_ARCH = ("{output_neurons: 40, embedding_dim: 8, rnn_layers: 1, rnn_neurons: 16, "
                "dnn_blocks: 1, dnn_neurons: 16, dropout: 0.0}")


def tiny_arguments(yaml, corpus, run_dir, epochs, *overrides, arch=TINY_ARCH, lm=None):
    """train.py's arguments for a tiny run; `lm`: an LM folder to decode with (default: the
    YAML's LM weight set to 0, no LM)."""
    lm_arguments = [f"--lm_folder={lm}"] if lm else ["--lm_weight=0.0"]
    return [
        "train.py", yaml,
        f"--data_folder={corpus}", f"--output_folder={run_dir}",
        f"--number_of_epochs={epochs}", "--output_neurons=40", f"--arch={arch}",
        "--warmup_steps=5", "--test_beam_size=2", "--max_decode_ratio=0.5", *lm_arguments,
        "--inter_ctc_layers=[1]",  # the mini YAMLs' layer 3 is beyond the tiny model's two
        *overrides,
    ]


def train_tiny(yaml, corpus, run_dir, epochs, *overrides, launcher=(sys.executable,), lm=None):
    """Runs the training to its end; returns the finished process (stdout and stderr)."""
    command = [*launcher, *tiny_arguments(yaml, corpus, run_dir, epochs, *overrides, lm=lm)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def free_port():
    """A free local port for torchrun's rendezvous (tests may run beside other torchruns)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
