import argparse
import csv
import json
import logging

import numpy as np
import pytest
import soundfile

from conformer_prune.prepare import (
    DataError,
    add_parser,
    prepare_librispeech,
)

SR = 16000
SPLITS = ("dev-clean", "test-clean")
# (speaker, chapter) -> {utt: (duration in seconds, transcript)}
CHAPTERS = {
    ("19", "198"): {"0000": (0.3, "HELLO WORLD"), "0001": (0.5, "IT'S A TEST")},
    ("26", "495"): {"0002": (0.4, "ONE, TWO")},
}


def write_flac(path, seconds, sr=SR, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.1 * np.sin(2 * np.pi * 440 * t)
    soundfile.write(path, np.stack([tone] * channels, axis=1), sr, format="FLAC")


def make_corpus(root, splits=SPLITS):
    """A tiny corpus in real LibriSpeech layout under ``root/LibriSpeech``."""
    librispeech = root / "LibriSpeech"
    for split in splits:
        for (spk, chapter), utts in CHAPTERS.items():
            chapter_dir = librispeech / split / spk / chapter
            chapter_dir.mkdir(parents=True)
            lines = []
            for utt, (seconds, words) in utts.items():
                write_flac(chapter_dir / f"{spk}-{chapter}-{utt}.flac", seconds)
                lines.append(f"{spk}-{chapter}-{utt} {words}\n")
            (chapter_dir / f"{spk}-{chapter}.trans.txt").write_text("".join(lines))
    (librispeech / "CORPUS.json").write_text("{}")
    return librispeech


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "data")


def prepare(data_folder, save_folder, **kwargs):
    return prepare_librispeech(data_folder, save_folder, splits=SPLITS, progress=False, **kwargs)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def chapter(corpus, spk="19", chapter="198", split="dev-clean"):
    return corpus / split / spk / chapter


def test_writes_speechbrain_csv(corpus, tmp_path):
    paths = prepare(corpus.parent, tmp_path / "out")

    assert paths == {split: tmp_path / "out" / f"{split}.csv" for split in SPLITS}
    for split in SPLITS:
        base = corpus.resolve() / split
        assert read_csv(paths[split]) == [
            ["ID", "duration", "wav", "spk_id", "wrd"],
            ["19-198-0000", "0.3", str(base / "19/198/19-198-0000.flac"), "19-198", "HELLO WORLD"],
            ["19-198-0001", "0.5", str(base / "19/198/19-198-0001.flac"), "19-198", "IT'S A TEST"],
            ["26-495-0002", "0.4", str(base / "26/495/26-495-0002.flac"), "26-495", "ONE, TWO"],
        ]
        assert (tmp_path / "out" / f"{split}_skipped.txt").read_text() == ""


def test_accepts_librispeech_folder_itself(corpus, tmp_path):
    from_root = prepare(corpus.parent, tmp_path / "a")
    from_librispeech = prepare(corpus, tmp_path / "b")
    for split in SPLITS:
        assert from_root[split].read_text() == from_librispeech[split].read_text()


def test_skips_when_done_and_redoes_when_options_change(corpus, tmp_path, caplog):
    out = tmp_path / "out"
    csv_path = prepare(corpus, out)["dev-clean"]
    csv_path.write_text("marker")  # survives only if the second call skips

    with caplog.at_level(logging.INFO, logger="conformer_prune.prepare"):
        prepare(corpus.parent, out)  # same corpus, other spelling of data_folder
    assert csv_path.read_text() == "marker"
    assert "skipping" in caplog.text

    prepare(corpus, out, max_duration=10.0)
    assert csv_path.read_text().startswith("ID,duration")
    assert json.loads((out / "prepare_opts.json").read_text())["max_duration"] == 10.0


def test_skip_prep_does_nothing(corpus, tmp_path):
    paths = prepare(corpus, tmp_path / "out", skip_prep=True)
    assert not paths["dev-clean"].exists()


def test_max_duration_skips_are_counted_and_listed(corpus, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="conformer_prune.prepare"):
        paths = prepare(corpus, out, max_duration=0.45)

    ids = [row[0] for row in read_csv(paths["test-clean"])[1:]]
    assert ids == ["19-198-0000", "26-495-0002"]
    assert (out / "test-clean_skipped.txt").read_text() == "19-198-0001 0.5\n"
    assert "test-clean: 2 utterances written" in caplog.text
    assert "1 longer than max_duration=0.45 skipped" in caplog.text


def expect_error(corpus, tmp_path, *fragments):
    with pytest.raises(DataError) as info:
        prepare(corpus, tmp_path / "out")
    for fragment in fragments:
        assert str(fragment) in str(info.value)
    assert not (tmp_path / "out" / "prepare_opts.json").exists()


def test_missing_split_names_folder_and_found_splits(tmp_path):
    corpus = make_corpus(tmp_path / "data", splits=("dev-clean", "train-clean-100"))
    expect_error(
        corpus, tmp_path,
        corpus.resolve() / "test-clean", "split folder not found", "dev-clean, train-clean-100",
    )


@pytest.mark.parametrize(
    "line, expected",
    [
        ("19-198-0000", "no transcript after 19-198-0000"),
        ("19-198-0000    ", "no transcript after 19-198-0000"),
        ("19-198-x HELLO", "bad utterance ID '19-198-x'"),
        ("19_198_0000 HELLO", "bad utterance ID"),
        ("19-199-0000 HELLO", "expected an ID starting with 19-198-"),
        ("20-198-0000 HELLO", "expected an ID starting with 19-198-"),
    ],
)
def test_malformed_transcript_line(corpus, tmp_path, line, expected):
    trans = chapter(corpus) / "19-198.trans.txt"
    trans.write_text(f"19-198-0001 IT'S A TEST\n{line}\n")
    expect_error(corpus, tmp_path, f"{trans.resolve()}:2:", expected)


def test_duplicate_transcript_line(corpus, tmp_path):
    trans = chapter(corpus) / "19-198.trans.txt"
    trans.write_text("19-198-0000 A\n19-198-0001 B\n19-198-0000 C\n")
    expect_error(corpus, tmp_path, f"{trans.resolve()}:3:", "already given on line 1")


def test_empty_transcript_file(corpus, tmp_path):
    trans = chapter(corpus) / "19-198.trans.txt"
    trans.write_text("\n")
    expect_error(corpus, tmp_path, trans.resolve(), "empty transcript")


def test_missing_transcript_file(corpus, tmp_path):
    trans = chapter(corpus) / "19-198.trans.txt"
    trans.unlink()
    expect_error(corpus, tmp_path, trans.resolve(), "transcript file not found")


def test_transcript_line_without_audio(corpus, tmp_path):
    trans = chapter(corpus) / "19-198.trans.txt"
    (chapter(corpus) / "19-198-0001.flac").unlink()
    expect_error(corpus, tmp_path, f"{trans.resolve()}:2:", "no audio file for 19-198-0001")


def test_audio_without_transcript_line(corpus, tmp_path):
    extra = chapter(corpus) / "19-198-0009.flac"
    write_flac(extra, 0.3)
    expect_error(corpus, tmp_path, extra.resolve(), "has no transcript line")


def test_unreadable_audio(corpus, tmp_path):
    bad = chapter(corpus) / "19-198-0000.flac"
    bad.write_bytes(b"not a flac file")
    expect_error(corpus, tmp_path, bad.resolve(), "unreadable audio file")


def test_wrong_sample_rate(corpus, tmp_path):
    bad = chapter(corpus) / "19-198-0000.flac"
    write_flac(bad, 0.3, sr=8000)
    expect_error(corpus, tmp_path, bad.resolve(), "8000 Hz; expected 16000 Hz")


def test_stereo(corpus, tmp_path):
    bad = chapter(corpus) / "19-198-0000.flac"
    write_flac(bad, 0.3, channels=2)
    expect_error(corpus, tmp_path, bad.resolve(), "2 channels; expected mono")


def test_transcript_that_is_not_utf8(corpus, tmp_path):
    trans = chapter(corpus) / "19-198.trans.txt"
    trans.write_bytes(trans.read_bytes().replace(b"19-198-0000 ", b"19-198-0000 CAF\xc9 "))
    expect_error(corpus, tmp_path, trans.resolve(), "not valid UTF-8 text")


def test_truncated_audio(corpus, tmp_path):
    """A copy cut short keeps a header that promises every sample: the end is read to tell."""
    bad = chapter(corpus) / "19-198-0000.flac"
    write_flac(bad, 2.0)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 3 // 4])
    expect_error(corpus, tmp_path, bad.resolve(), "truncated or corrupt audio")


def test_audio_without_samples(corpus, tmp_path):
    bad = chapter(corpus) / "19-198-0000.flac"
    soundfile.write(bad, np.zeros(0), SR, format="WAV")  # FLAC cannot hold 0 samples
    expect_error(corpus, tmp_path, bad.resolve(), "no samples")


def test_audio_that_is_not_flac(corpus, tmp_path):
    flac = chapter(corpus) / "19-198-0000.flac"
    wav = flac.with_suffix(".wav")
    soundfile.write(wav, soundfile.read(flac)[0], SR)
    flac.unlink()
    expect_error(corpus, tmp_path, wav.resolve(), "not FLAC")


def test_non_ascii_transcripts_are_kept_and_counted(corpus, tmp_path, caplog):
    trans = chapter(corpus) / "19-198.trans.txt"
    lines = trans.read_text().splitlines()
    utt_id, words = lines[0].split(maxsplit=1)
    trans.write_text("\n".join([f"{utt_id} CAFÉ {words}", *lines[1:]]) + "\n")
    with caplog.at_level("INFO"):
        prepare(corpus, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "dev-clean.csv")
    assert any(row[-1].startswith("CAFÉ ") for row in rows)
    assert "dev-clean: 1 transcripts have characters outside ASCII (kept): 'É' x1" in caplog.text


def make_cli():
    parser = argparse.ArgumentParser(prog="conformer-prune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = make_cli().parse_args([
        "prepare", "--data-folder", str(corpus.parent), "--save-folder", str(out),
        "--splits", "dev-clean, test-clean", "--max-duration", "0.35",
    ])
    assert args.func(args) == 0
    assert len(read_csv(out / "dev-clean.csv")) == 2  # header + the one 0.3 s utterance
    assert not (out / "train-clean-100.csv").exists()
    assert str(out / "test-clean.csv") in capsys.readouterr().out


def test_cli_reports_data_error(tmp_path, capsys):
    args = make_cli().parse_args([
        "prepare", "--data-folder", str(tmp_path / "nowhere"), "--save-folder", str(tmp_path / "out"),
    ])
    assert args.func(args) == 1
    assert "data folder does not exist" in capsys.readouterr().err
