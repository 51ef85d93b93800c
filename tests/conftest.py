import pytest

from conformer_prune.synth import build_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny corpus in LibriSpeech's layout (about 70 s of training speech)."""
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, hours=0.02, seed=7, eval_hours=0.004, progress=False)
    return out
