"""A character language model for the beam search: SpeechBrain's RNNLM, fused with
SpeechBrain's RNNLMScorer (shallow fusion, as SpeechBrain's LibriSpeech recipes decode).

Why: after about 1,200 updates the mini recogniser gets most characters of a word right and
still misspells many words; text costs no audio, and an LM trained on it moves the search
towards words and word sequences that exist (docs/TRAINING.md has the measured WER).

- Train: `python train_lm.py hparams/mini/lm_char.yaml --data_folder corpus` on the corpus's LM
  text (`librispeech-lm-norm.txt`, which the corpus builder writes without any dev or test
  sentence) plus the train transcripts; it writes an LM folder (LM_FILES).
- Use: an ASR YAML's `lm_folder` and `lm_weight` (0: no LM). train.py's test stage and
  `conformer-prune decode` call `attach_lm`; `conformer-prune shrink` copies the LM files into
  the compact folder, so that folder stays self-contained.

The LM reads the recogniser's own token ids, so its folder keeps the tokenizer it was trained
with, and `load_lm` refuses a recogniser whose tokenizer has other pieces.
"""

import json
import warnings
from pathlib import Path

import sentencepiece
import torch
from speechbrain.decoders.scorer import RNNLMScorer
from speechbrain.lobes.models.RNNLM import RNNLM

from conformer_prune.errors import InputError

LM_WEIGHTS, LM_INFO, LM_TOKENIZER = "lm.ckpt", "lm.json", "tokenizer.ckpt"
LM_FILES = (LM_WEIGHTS, LM_INFO, LM_TOKENIZER)
LM_SCORER = "rnnlm"  # ScorerBuilder's name for an RNNLMScorer (its class name, lower case)


def build_lm(arch):
    """SpeechBrain's RNNLM from the `lm_arch` of a YAML or an lm.json; it returns its hidden
    state, which RNNLMScorer carries from one search step to the next."""
    with warnings.catch_warnings():  # torch warns that a 1-layer LSTM ignores its dropout
        warnings.filterwarnings("ignore", message="dropout option adds dropout")
        return RNNLM(return_hidden=True, **arch)


def _build_without_drawing(arch):
    """build_lm for weights about to be loaded, its random initialisation drawn from a forked
    generator: loading an LM must not move the global random stream (a recogniser that loaded
    its LM before training would otherwise train on other dropout and noise draws)."""
    with torch.random.fork_rng(devices=[]):
        return build_lm(arch)


def pieces_of(tokenizer):
    """The SentencePiece model's pieces in id order: what two tokenizers must share."""
    return [tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())]


def lm_sentences(transcripts, lm_text, tokenizer):
    """(sentences, skipped): the train transcripts and the lines of the LM text file (None: no
    file) whose characters the tokenizer has. A sentence with a character the recogniser
    never saw would be read as <unk> and teach the LM a token the search never asks about."""
    sentences = [t.strip() for t in transcripts if t.strip()]
    if lm_text:
        path = Path(lm_text)
        if not path.is_file():
            raise InputError(
                f"{path}: the LM text is missing; `conformer-prune synth-corpus` writes it beside "
                "LibriSpeech/ (real LibriSpeech: librispeech-lm-norm.txt from openslr.org/11), "
                "or train on the transcripts alone with --lm_text null")
        sentences += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                      if line.strip()]
    known = set("".join(pieces_of(tokenizer)).replace("\u2581", " ")) | {" "}
    kept = [s for s in sentences if set(s) <= known]
    if not kept:
        raise InputError(f"no LM sentence is made of the tokenizer's characters "
                         f"(LM text: {lm_text}; {len(sentences)} sentences)")
    return kept, len(sentences) - len(kept)


def check_lm_folder(folder):
    """The LM folder, or an InputError that says how to make it."""
    folder = Path(folder)
    missing = [name for name in LM_FILES if not (folder / name).is_file()]
    if missing:
        raise InputError(
            f"{folder}: no language model here (missing {', '.join(missing)}); train it first "
            "(python train_lm.py hparams/mini/lm_char.yaml --data_folder corpus) or decode "
            "without one (--lm_weight 0)")
    return folder


def check_lm_tokens(folder, tokenizer):
    """The LM scores token ids: its tokenizer (in `folder`) and the recogniser's `tokenizer` (a
    SentencePiece model or its file) must have the same pieces, or other ids would score other
    characters."""
    def load(model):
        if not isinstance(model, (str, Path)):
            return model
        processor = sentencepiece.SentencePieceProcessor()
        processor.load(str(model))
        return processor

    own, theirs = pieces_of(load(Path(folder) / LM_TOKENIZER)), pieces_of(load(tokenizer))
    if own != theirs:
        raise InputError(
            f"{Path(folder) / LM_TOKENIZER}: the LM was trained with other tokens than the "
            f"recogniser's ({own} against {theirs}); train the LM on the recogniser's corpus")


def load_lm(folder, tokenizer=None):
    """The LM of a folder that train_lm.py (or conformer-prune shrink) wrote, in eval mode;
    with `tokenizer`, the recogniser's, checked to share its tokens (check_lm_tokens)."""
    folder = check_lm_folder(folder)
    info = json.loads((folder / LM_INFO).read_text(encoding="utf-8"))
    if tokenizer is not None:
        check_lm_tokens(folder, tokenizer)
    lm = _build_without_drawing(info["arch"])
    lm.load_state_dict(torch.load(folder / LM_WEIGHTS, map_location="cpu"))
    return lm.eval()


def quantize_lm_int8(lm):
    """PyTorch's dynamic int8 quantisation of the LM's LSTM and Linear layers, in place (CPU):
    weights stored as int8, activations quantised per call. The search runs the LM once per
    step for every hypothesis, so its time is a share of every decode (docs/SPEED.md)."""
    torch.ao.quantization.quantize_dynamic(lm, {torch.nn.LSTM, torch.nn.Linear},
                                           dtype=torch.qint8, inplace=True)
    for module in lm.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.LSTM):
            # SpeechBrain's LSTM wrapper calls it before each forward; it only arranges cuDNN's
            # weights, and the quantised LSTM has none to arrange.
            module.flatten_parameters = lambda: None
    return lm


def check_run_lm(hparams, tokenizer):
    """The LM that a recogniser's YAML asks for (`lm_weight` > 0, from `lm_folder`) is there
    and reads the recogniser's tokens: train.py asks before training, so that a missing LM
    stops the run at once, not after it. Nothing is built."""
    if hparams.get("lm_weight"):
        check_lm_tokens(check_lm_folder(hparams["lm_folder"]), tokenizer)


def run_lm(hparams, tokenizer):
    """The LM that a recogniser's YAML asks for, loaded, or None (`lm_weight` 0)."""
    if not hparams.get("lm_weight"):
        return None
    return load_lm(hparams["lm_folder"], tokenizer)


def attach_lm(searcher, lm, weight):
    """Adds (or with weight 0 removes) the LM in a SpeechBrain beam searcher's ScorerBuilder:
    each step's log-probabilities get `weight` times the LM's, next to the attention decoder's
    and the CTC prefix scorer's."""
    scorer = getattr(searcher, "scorer", None)
    if scorer is None:
        raise InputError("the beam searcher has no scorer (ScorerBuilder) to add the LM to")
    scorer.full_scorers.pop(LM_SCORER, None)
    scorer.weights.pop(LM_SCORER, None)
    if weight > 0:
        device = next(searcher.parameters(), torch.empty(0)).device
        scorer.full_scorers[LM_SCORER] = RNNLMScorer(lm.to(device).eval())
        scorer.weights[LM_SCORER] = float(weight)
    return searcher
