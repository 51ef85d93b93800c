import subprocess
import sys

import pytest

from conformer_prune.synth import build_corpus
from tiny_runs import ROOT, TINY_LM_ARCH


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny corpus in LibriSpeech's layout (about 70 s of training speech)."""
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, hours=0.02, seed=7, eval_hours=0.004, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_lm(corpus, tmp_path_factory):
    """A tiny character LM trained on the tiny corpus by train_lm.py (one epoch)."""
    out = tmp_path_factory.mktemp("lm") / "lm_char"
    command = [sys.executable, "train_lm.py", "hparams/mini/lm_char.yaml",
               f"--data_folder={corpus}", f"--output_folder={out}", "--number_of_epochs=1",
               "--output_neurons=40", f"--lm_arch={TINY_LM_ARCH}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return out
