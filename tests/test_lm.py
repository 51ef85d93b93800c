"""The character LM: its text, its training recipe (train_lm.py), loading it against the
recogniser's tokens, and fusing it into SpeechBrain's beam search."""

import json
import subprocess
import sys

import pytest
import torch
from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder

from conformer_prune.errors import InputError
from conformer_prune.lm import (
    LM_SCORER,
    attach_lm,
    build_lm,
    lm_sentences,
    load_lm,
    pieces_of,
)
from conformer_prune.synth import LM_TEXT_FILE
from tiny import char_tokenizer
from tiny_runs import ROOT, TINY_LM_ARCH


def transcripts_of(corpus, splits):
    return {line.split(" ", 1)[1].strip()
            for split in splits
            for path in (corpus / "LibriSpeech" / split).glob("*/*/*.trans.txt")
            for line in path.read_text().splitlines()}


def test_the_corpus_lm_text_has_no_dev_or_test_sentence(corpus):
    lines = (corpus / LM_TEXT_FILE).read_text().splitlines()
    held_out = transcripts_of(corpus, ("dev-clean", "test-clean", "test-other"))
    assert held_out and not held_out & set(lines)
    assert transcripts_of(corpus, ("train-clean-100",)) <= set(lines)
    assert lines == sorted(set(lines)) and len(lines) > 1000
    summary = json.loads((corpus / "LibriSpeech" / "CORPUS.json").read_text())["text"]["lm_text"]
    assert summary == {"file": LM_TEXT_FILE, "sentences": len(lines),
                       "excluded_eval_sentences": len(held_out)}


def test_lm_sentences_skip_characters_the_tokenizer_lacks(tmp_path):
    _, tokenizer = char_tokenizer(tmp_path)  # pangrams: every letter, no apostrophe
    text = tmp_path / "lm.txt"
    text.write_text("THE LAZY DOG\nDON'T JUMP\n\nA FOX\n")
    sentences, skipped = lm_sentences(["QUICK BROWN FOX "], text, tokenizer)
    assert sentences == ["QUICK BROWN FOX", "THE LAZY DOG", "A FOX"] and skipped == 1
    with pytest.raises(InputError, match=r"nope\.txt: the LM text is missing"):
        lm_sentences([], tmp_path / "nope.txt", tokenizer)


def test_train_lm_writes_an_lm_folder_that_loads_with_the_recogniser_tokens(tiny_lm, tmp_path):
    info = json.loads((tiny_lm / "lm.json").read_text())
    assert info["epochs"] == 1 and info["sentences"] > 1000 and info["skipped_sentences"] >= 0
    assert 0 < info["valid_loss_nats_per_token"] < 10
    tokenizer_file = tiny_lm / "tokenizer.ckpt"
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file))
    lm = load_lm(tiny_lm, tokenizer)
    assert not lm.training and lm.out.w.out_features == 40

    _, other = char_tokenizer(tmp_path)  # the pangrams' characters: other ids
    assert pieces_of(other) != pieces_of(tokenizer)
    with pytest.raises(InputError, match="other tokens than the recogniser's"):
        load_lm(tiny_lm, other)
    with pytest.raises(InputError, match="no language model here"):
        load_lm(tmp_path)


def test_checking_or_loading_the_lm_leaves_the_random_stream_alone(tiny_lm):
    """train.py checks the LM before training and loads it after: neither may change what a
    recogniser trains on, so the global generator must be where it was."""
    import sentencepiece

    from conformer_prune.lm import check_run_lm, run_lm

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tiny_lm / "tokenizer.ckpt"))
    hparams = {"lm_weight": 0.7, "lm_folder": str(tiny_lm)}
    torch.manual_seed(3)
    before = torch.get_rng_state()
    check_run_lm(hparams, tokenizer)
    assert run_lm(hparams, tokenizer) is not None
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(InputError, match="no language model here"):
        check_run_lm({**hparams, "lm_folder": str(tiny_lm / "nothing")}, tokenizer)
    assert run_lm({**hparams, "lm_weight": 0.0}, tokenizer) is None


def test_train_lm_run_again_is_done_and_refuses_other_settings(tiny_lm):
    weights = (tiny_lm / "lm.ckpt").read_bytes()
    base = [sys.executable, "train_lm.py", "hparams/mini/lm_char.yaml",
            f"--output_folder={tiny_lm}", "--number_of_epochs=1", "--output_neurons=40",
            f"--lm_arch={TINY_LM_ARCH}"]
    corpus = json.loads((tiny_lm / "lm.json").read_text())["lm_text"].rsplit("/", 1)[0]
    again = subprocess.run([*base, f"--data_folder={corpus}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tiny_lm / "lm.ckpt").read_bytes() == weights  # nothing trained again
    other = subprocess.run([*base, f"--data_folder={corpus}", "--lr=0.01"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 1 and "lr" in other.stderr.splitlines()[-1]


def test_rescoring_scores_a_hypothesis_as_the_beam_search_steps_would():
    """CompactASR.lm_scores (one teacher-forced pass over padded hypotheses) equals the sum of
    RNNLMScorer's step-by-step log-probabilities from <bos> to <eos>."""
    from types import SimpleNamespace

    from speechbrain.decoders.scorer import RNNLMScorer

    from conformer_prune.inference import CompactASR

    torch.manual_seed(0)
    lm = build_lm({"output_neurons": 6, "embedding_dim": 4, "rnn_layers": 1, "rnn_neurons": 8,
                   "dnn_blocks": 1, "dnn_neurons": 8, "dropout": 0.0}).eval()
    asr = SimpleNamespace(hparams=SimpleNamespace(bos_index=1, eos_index=2), lm=lm,
                          device="cpu")
    asr._teacher_forced = lambda token_lists: CompactASR._teacher_forced(asr, token_lists)
    hypotheses = [[3, 4, 5, 3], [5], []]
    batched = CompactASR.lm_scores(asr, hypotheses)
    scorer = RNNLMScorer(lm)
    for hypothesis, score in zip(hypotheses, batched):
        memory, total = None, 0.0
        for previous, token in zip([1, *hypothesis], [*hypothesis, 2]):
            log_probs, memory = scorer.score(torch.tensor([previous]), memory, None, None)
            total += float(log_probs[0, token])
        assert float(score) == pytest.approx(total, abs=1e-5)


def test_attach_lm_adds_and_removes_the_rnnlm_scorer():
    ctc = CTCScorer(ctc_fc=torch.nn.Linear(4, 6), blank_index=0, eos_index=2)
    scorer = ScorerBuilder(partial_scorers=[ctc], weights={"ctc": 0.4})
    searcher = torch.nn.Module()
    searcher.scorer, searcher.lin = scorer, torch.nn.Linear(2, 2)
    lm = build_lm({"output_neurons": 6, "embedding_dim": 4, "rnn_layers": 1, "rnn_neurons": 8,
                   "dnn_blocks": 1, "dnn_neurons": 8, "dropout": 0.0})
    attach_lm(searcher, lm, 0.5)
    assert scorer.weights[LM_SCORER] == 0.5 and scorer.full_scorers[LM_SCORER].lm is lm
    attach_lm(searcher, lm, 0.0)
    assert LM_SCORER not in scorer.weights and LM_SCORER not in scorer.full_scorers
    assert scorer.weights["ctc"] == 0.4


def test_the_int8_lm_scores_close_to_the_float_one_through_speechbrains_scorer(tiny_lm):
    from speechbrain.decoders.scorer import RNNLMScorer

    from conformer_prune.lm import quantize_lm_int8

    float_lm, int8_lm = load_lm(tiny_lm), quantize_lm_int8(load_lm(tiny_lm))
    assert any(isinstance(module, torch.ao.nn.quantized.dynamic.LSTM)
               for module in int8_lm.modules())
    tokens = torch.tensor([1, 5, 6, 7, 3, 8])
    scores = {}
    for name, lm in (("float", float_lm), ("int8", int8_lm)):
        scorer, memory, steps = RNNLMScorer(lm), None, []
        for token in tokens:  # the search's steps, the hidden state carried between them
            log_probs, memory = scorer.score(token.view(1), memory, None, None)
            steps.append(log_probs[0])
        scores[name] = torch.stack(steps)
    assert torch.isfinite(scores["int8"]).all()
    assert not torch.equal(scores["int8"], scores["float"])  # quantised, not the same model
    assert (scores["int8"] - scores["float"]).abs().max() < 0.5
