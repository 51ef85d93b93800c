"""Tests of the offline corpus builder (conformer_prune/synth.py) on tiny corpora."""

import hashlib
import json
import re

import numpy as np
import pytest
import soundfile

from conformer_prune import synth

TINY = {"hours": 0.005, "eval_hours": 0.005, "seed": 7, "progress": False}
UTT_LINE = re.compile(r"^(\d+)-(\d+)-(\d{4}) ([A-Z']+( [A-Z']+)*)$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    summary = synth.build_corpus(out, workers=2, **TINY)
    return out / "LibriSpeech", summary


def audio_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.flac"))}


def transcripts(root):
    return {p.relative_to(root).as_posix(): p.read_text()
            for p in sorted(root.rglob("*.trans.txt"))}


def speakers_of(root, split):
    return {p.name for p in (root / split).iterdir()}


def test_layout_naming_and_transcripts(corpus):
    root, summary = corpus
    assert set(summary) == set(synth.SPLITS)
    for split in synth.SPLITS:
        trans_files = sorted((root / split).glob("*/*/*.trans.txt"))
        assert trans_files, split
        for trans in trans_files:
            speaker, chapter = trans.parent.parent.name, trans.parent.name
            assert speaker.isdigit() and chapter.isdigit()
            assert trans.name == f"{speaker}-{chapter}.trans.txt"
            lines = trans.read_text().splitlines()
            assert lines == sorted(lines)
            numbers = []
            for line in lines:
                match = UTT_LINE.match(line)
                assert match, line
                assert match.group(1, 2) == (speaker, chapter)
                assert synth.MIN_WORDS <= len(match.group(4).split()) <= synth.MAX_WORDS
                assert (trans.parent / f"{line.split()[0]}.flac").is_file()
                numbers.append(int(match.group(3)))
            assert numbers == list(range(len(numbers)))
    assert json.loads((root / "CORPUS.json").read_text())["complete"] is True


def test_audio_is_16k_mono_flac_of_sane_length(corpus):
    root, summary = corpus
    flacs = sorted(root.rglob("*.flac"))
    assert len(flacs) == sum(row["utterances"] for row in summary.values())
    for flac in flacs:
        info = soundfile.info(str(flac))
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 16000, 1)
        assert 1.0 <= info.duration <= 10.0


def test_speakers_are_disjoint_between_splits(corpus):
    root, _ = corpus
    by_split = {split: speakers_of(root, split) for split in synth.SPLITS}
    for i, a in enumerate(synth.SPLITS):
        for b in synth.SPLITS[i + 1:]:
            assert not by_split[a] & by_split[b], (a, b)
    recipes = json.loads((root / "SPEAKERS.json").read_text())
    assert set(recipes) == set().union(*by_split.values())
    for split, ids in by_split.items():
        assert all(recipes[i]["split"] == split for i in ids)


def test_speaker_pool_holds_out_voices():
    speakers = synth.make_speakers(1, synth.available_dialects(), synth.available_variants(),
                                   synth.available_flite_voices())
    train = speakers[synth.TRAIN_SPLIT]
    assert len(train) >= 40
    train_variants = {s["variant"] for s in train if s["engine"] == "espeak-ng"}
    train_dialects = {s["voice"] for s in train if s["engine"] == "espeak-ng"}
    seen = set(train_variants)
    for split in synth.EVAL_SPLITS:
        espeak = [s for s in speakers[split] if s["engine"] == "espeak-ng"]
        variants = {s["variant"] for s in espeak}
        assert espeak and not variants & seen, split  # unseen variants, not in earlier splits
        assert {s["voice"] for s in espeak} <= train_dialects  # but familiar dialects
        seen |= variants
    ids = [s["id"] for split in speakers.values() for s in split]
    assert len(ids) == len(set(ids))


def test_sentences_of_eval_splits_are_not_in_train(corpus):
    root, _ = corpus
    words = {split: {line.split(" ", 1)[1] for p in (root / split).rglob("*.trans.txt")
                     for line in p.read_text().splitlines()}
             for split in synth.SPLITS}
    for split in synth.EVAL_SPLITS:
        assert not words[split] & words[synth.TRAIN_SPLIT]


def test_same_seed_same_corpus_whatever_the_workers(corpus, tmp_path):
    root, _ = corpus
    synth.build_corpus(tmp_path, workers=1, **TINY)
    again = tmp_path / "LibriSpeech"
    assert transcripts(again) == transcripts(root)
    assert audio_hashes(again) == audio_hashes(root)
    assert (again / "SPEAKERS.json").read_text() == (root / "SPEAKERS.json").read_text()


def test_rerun_keeps_valid_files_and_redoes_broken_ones(tmp_path):
    synth.build_corpus(tmp_path, workers=1, **TINY)
    root = tmp_path / "LibriSpeech"
    before = audio_hashes(root)
    flacs = sorted(root.rglob("*.flac"))
    missing, broken, kept = flacs[0], flacs[1], flacs[2:]
    missing.unlink()
    broken.write_bytes(b"not a flac")
    mtimes = {p: p.stat().st_mtime_ns for p in kept}

    synth.build_corpus(tmp_path, workers=1, **TINY)
    assert audio_hashes(root) == before
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes


def test_refuses_to_mix_recipes_in_one_folder(tmp_path):
    synth.build_corpus(tmp_path, workers=1, **TINY)
    with pytest.raises(synth.CorpusError, match="another --out"):
        synth.build_corpus(tmp_path, workers=1, **{**TINY, "seed": 8})


def test_validation_reports_missing_audio(corpus, tmp_path):
    root, summary = corpus
    assert synth.validate(root) == summary
    copy = tmp_path / "LibriSpeech"
    for path in root.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    next(copy.joinpath("test-clean").rglob("*.flac")).unlink()
    with pytest.raises(synth.CorpusError, match="missing"):
        synth.validate(copy)


def leading_noise_db(flac):
    """Utterance power over the power of its first 100 ms, which is silence padding."""
    audio, rate = soundfile.read(str(flac))
    return 10 * np.log10(np.mean(audio ** 2) / np.mean(audio[:rate // 10] ** 2))


def test_test_other_is_degraded(corpus):
    root, _ = corpus
    clean = [leading_noise_db(f) for f in (root / "test-clean").rglob("*.flac")]
    other = [leading_noise_db(f) for f in (root / "test-other").rglob("*.flac")]
    # Clean splits have a 30-50 dB noise floor, test-other 15-20 dB noise plus reverberation.
    assert np.median(clean) > 25
    assert np.median(other) < 22
    degradation = json.loads((root / "CORPUS.json").read_text())["degradation"]
    assert degradation["split"] == "test-other"
    assert degradation["noise"]["snr_db"] == list(synth.OTHER_SNR_DB)


def test_vocabulary_filter():
    sentences = ["THE CAT SAT", "THE CAT RAN", "THE DOG SAT", "THE CAT SAT", "THE CAT",
                 "ZEBRAS SAT QUIETLY"]
    kept, vocab = synth.select_sentences(sentences, vocab_size=4)
    # Counted over distinct sentences: THE 4, CAT 3, SAT 3, then DOG, QUIETLY, RAN and
    # ZEBRAS once each, of which the alphabetical tie-break keeps DOG.
    assert vocab == {"THE", "CAT", "SAT", "DOG"}
    # "THE CAT" is too short; RAN, ZEBRAS and QUIETLY are out of the vocabulary.
    assert kept == ["THE CAT SAT", "THE DOG SAT"]


def test_evaluation_blocks_have_a_closed_vocabulary():
    pool = ["A B C", "A D", "B C", "A B", "C D", "A C", "B D", "E A", "A B D"]
    blocks = synth.closed_vocabulary_blocks(pool, n_blocks=2, block_size=2)
    taken = [s for block in blocks for s in block]
    assert len(set(taken)) == len(taken) <= 4
    train = [s for s in pool if s not in taken]
    for sentence in taken:
        for word in sentence.split():
            assert sum(word in s.split() for s in train) >= synth.MIN_TRAIN_SENTENCES
    # E occurs once in the pool, so "E A" can only be trained on.
    assert "E A" in train


def test_corpus_words_come_from_the_vocabulary(corpus):
    root, _ = corpus
    pool, text = synth.load_text(synth.DEFAULT_VOCAB_SIZE)
    vocab = {w for s in pool for w in s.split()}
    assert len(vocab) <= synth.DEFAULT_VOCAB_SIZE == text["vocab_size"]
    for trans in root.rglob("*.trans.txt"):
        for line in trans.read_text().splitlines():
            assert set(line.split()[1:]) <= vocab


@pytest.mark.parametrize("raw, expected", [
    ("Don't panic -- it's only a test.", "DON'T PANIC IT'S ONLY A TEST"),
    ("A long-forgotten friend will appear.", "A LONG FORGOTTEN FRIEND WILL APPEAR"),
    ("Collect $200 now.", None),  # digits and symbols would be read differently
    ("The USA is big.", None),  # an acronym would be spelled out
    ("He met Mr.", None),  # cut at an abbreviation
    ("Use e.g. this one.", None),
    ("A: Because it was there.", "BECAUSE IT WAS THERE"),  # dialogue labels are not said
    ("(a) once a year.", "ONCE A YEAR"),  # nor list labels
])
def test_normalise(raw, expected):
    assert synth.normalise(raw) == expected


def test_cli_parser():
    import argparse
    parser = argparse.ArgumentParser()
    synth.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth-corpus", "--out", "x", "--hours", "0.5", "--seed", "3",
                              "--eval-hours", "0.1", "--workers", "1"])
    assert (args.out, args.hours, args.seed, args.eval_hours, args.workers) == \
        ("x", 0.5, 3, 0.1, 1)
    assert args.func is synth.run


def test_far_field_records_the_studio_corpus_sentences_and_speakers_across_a_room(tmp_path):
    """The fine-tuning domain of docs/DELTA.md: with the studio corpus's seed and sizes, every
    split has the same speakers and sentences, and every utterance is reverberant and at the
    far-field SNR (so its test-clean is the studio test-clean heard from afar)."""
    plans = {condition: synth.plan_corpus(tmp_path, 0.01, 7, 0.003, 60, condition)[0]
             for condition in ("studio", "far-field")}
    room = synth.CONDITIONS["far-field"]
    for studio, far in zip(plans["studio"], plans["far-field"], strict=True):
        assert (far["utt_id"], far["transcript"], far["voice"]) == \
            (studio["utt_id"], studio["transcript"], studio["voice"])
        assert room["rt60_s"][0] <= far["rt60_s"] <= room["rt60_s"][1]
        assert room["snr_db"][0] <= far["snr_db"] <= room["snr_db"][1]
    assert synth.plan_digest(plans["studio"]) != synth.plan_digest(plans["far-field"])
    with pytest.raises(synth.CorpusError, match="condition 'outdoors'"):
        synth.build_corpus(tmp_path, 0.01, condition="outdoors")
