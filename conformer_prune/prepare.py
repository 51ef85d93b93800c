"""Data preparation: a LibriSpeech-layout corpus -> SpeechBrain CSVs.

Writes ``<save_folder>/<split>.csv`` with the columns and naming of SpeechBrain's
``librispeech_prepare`` (``ID,duration,wav,spk_id,wrd``), see docs/FORMATS.md.
Works on real LibriSpeech and on the project's synthesised corpus alike.

Every problem in the input stops the run with one ``DataError`` naming the file,
because a silently dropped utterance would bias WER comparisons between runs.
"""

import csv
import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import soundfile

from conformer_prune.errors import InputError
from conformer_prune.progress import progress as progress_bar

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
DEFAULT_SPLITS = ("train-clean-100", "dev-clean", "test-clean", "test-other")
CSV_HEADER = ["ID", "duration", "wav", "spk_id", "wrd"]
OPTS_FILE = "prepare_opts.json"
UTT_ID = re.compile(r"(\d+)-(\d+)-(\d+)")
LINE_FORM = "'<speaker>-<chapter>-<utt> WORDS'"
OTHER_AUDIO = {".wav", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".sph", ".aiff", ".aif"}


class DataError(InputError):
    """The corpus on disk does not match the LibriSpeech layout."""


class Utterance(NamedTuple):
    utt_id: str
    spk_id: str
    words: str
    wav: Path


def prepare_librispeech(
    data_folder,
    save_folder,
    splits=DEFAULT_SPLITS,
    max_duration=None,
    skip_prep=False,
    progress=True,
):
    """Write one CSV per split and return ``{split: csv_path}``.

    Does nothing when ``skip_prep`` is set, or when ``save_folder`` already holds
    the outputs of a run with the same options. Safe to wrap in
    ``speechbrain.utils.distributed.run_on_main``.
    """
    save_folder = Path(save_folder)
    csv_paths = {split: save_folder / f"{split}.csv" for split in splits}
    if skip_prep:
        return csv_paths

    root = find_librispeech_root(data_folder)
    opts = {
        "data_folder": str(root),
        "splits": list(splits),
        "max_duration": max_duration,
    }
    opts_path = save_folder / OPTS_FILE
    if outputs_are_current(opts_path, opts, splits):
        logger.info("%s already prepared with the same options, skipping", save_folder)
        return csv_paths

    check_splits_exist(root, splits)
    save_folder.mkdir(parents=True, exist_ok=True)
    # Forget the old options first: an interrupted redo must not look finished.
    opts_path.unlink(missing_ok=True)
    for split in splits:
        prepare_split(root, split, save_folder, max_duration, progress)
    with atomic_write(opts_path) as f:
        json.dump(opts, f, indent=2)
    return csv_paths


def find_librispeech_root(data_folder):
    """Accept either the ``LibriSpeech`` folder itself or its parent."""
    data_folder = Path(data_folder).resolve()
    if not data_folder.is_dir():
        raise DataError(f"{data_folder}: data folder does not exist")
    if (data_folder / "LibriSpeech").is_dir():
        return data_folder / "LibriSpeech"
    return data_folder


def outputs_are_current(opts_path, opts, splits):
    if not opts_path.is_file():
        return False
    with open(opts_path, encoding="utf-8") as f:
        if json.load(f) != opts:
            return False
    folder = opts_path.parent
    return all(
        (folder / f"{split}.csv").is_file() and (folder / f"{split}_skipped.txt").is_file()
        for split in splits
    )


def check_splits_exist(root, splits):
    """Fail before any work is done, rather than after hours on the first split."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    for split in splits:
        if not (root / split).is_dir():
            raise DataError(
                f"{root / split}: split folder not found; "
                f"splits found in {root}: {', '.join(found) or 'none'}"
            )


def prepare_split(root, split, save_folder, max_duration, progress):
    split_dir = root / split
    utterances = sorted(
        (utt for chapter_dir in chapter_dirs(split_dir) for utt in read_chapter(chapter_dir)),
        key=lambda utt: utt.utt_id,
    )
    if not utterances:
        raise DataError(
            f"{split_dir}: no utterances; expected "
            "<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac files"
        )

    rows, skipped = [], []
    bar = progress_bar(len(utterances), f"prepare {split}", unit="file", enabled=progress)
    for utt in utterances:
        duration = audio_duration(utt.wav)
        bar.update()
        if max_duration is not None and duration > max_duration:
            skipped.append((utt.utt_id, duration))
        else:
            rows.append([utt.utt_id, str(duration), str(utt.wav), utt.spk_id, utt.words])
    bar.close()

    csv_path = save_folder / f"{split}.csv"
    with atomic_write(csv_path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)
    skipped_path = save_folder / f"{split}_skipped.txt"
    # Written even when empty, so a stale list from older options never survives.
    with atomic_write(skipped_path) as f:
        f.writelines(f"{utt_id} {duration}\n" for utt_id, duration in skipped)

    logger.info(
        "%s: %d utterances written to %s; %d longer than max_duration=%s skipped (listed in %s)",
        split, len(rows), csv_path, len(skipped), max_duration, skipped_path,
    )
    log_non_ascii(split, rows)
    return csv_path


def log_non_ascii(split, rows):
    """Counts transcripts with characters outside ASCII. They are kept (a corpus in another
    language needs them; the character tokenizer learns them, and train.py says so if they
    exceed output_neurons), but LibriSpeech has none, so their number is worth a log line."""
    symbols = {}
    for row in rows:
        for char in row[-1]:
            if not char.isascii():
                symbols[char] = symbols.get(char, 0) + 1
    if symbols:
        utterances = sum(1 for row in rows if not row[-1].isascii())
        listing = ", ".join(f"{char!r} x{count}" for char, count in sorted(symbols.items()))
        logger.info("%s: %d transcripts have characters outside ASCII (kept): %s",
                    split, utterances, listing)


def chapter_dirs(split_dir):
    for speaker_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        yield from sorted(p for p in speaker_dir.iterdir() if p.is_dir())


def read_chapter(chapter_dir):
    """Pair every transcript line of a chapter with its audio file, both ways."""
    speaker, chapter = chapter_dir.parent.name, chapter_dir.name
    trans_path = chapter_dir / f"{speaker}-{chapter}.trans.txt"
    if not trans_path.is_file():
        raise DataError(f"{trans_path}: transcript file not found in chapter folder")
    transcript = read_transcript(trans_path, speaker, chapter)
    audio = {p.stem: p for p in chapter_dir.glob("*.flac")}
    other = sorted(p for p in chapter_dir.iterdir() if p.suffix.lower() in OTHER_AUDIO)
    if other:
        raise DataError(
            f"{other[0]}: audio that is not FLAC ({len(other)} such file(s) in {chapter_dir}); "
            "the LibriSpeech layout has 16 kHz mono .flac files (e.g. "
            "`sox in.wav -r 16000 -c 1 out.flac`)")

    orphans = sorted(audio.keys() - transcript.keys())
    if orphans:
        raise DataError(f"{audio[orphans[0]]}: audio file has no transcript line in {trans_path}")
    utterances = []
    for utt_id, (words, lineno) in transcript.items():
        if utt_id not in audio:
            raise DataError(
                f"{trans_path}:{lineno}: no audio file for {utt_id}; "
                f"expected {chapter_dir / (utt_id + '.flac')}"
            )
        utterances.append(Utterance(utt_id, f"{speaker}-{chapter}", words, audio[utt_id]))
    return utterances


def read_transcript(trans_path, speaker, chapter):
    """Return ``{utt_id: (words, line_number)}`` for one ``trans.txt``."""
    try:
        lines = trans_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{trans_path}: not valid UTF-8 text ({err})") from None

    transcript = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # a blank line holds no utterance, so nothing is lost
        where = f"{trans_path}:{lineno}"
        fields = line.split(maxsplit=1)
        utt_id = fields[0]
        words = " ".join(fields[1].split()) if len(fields) > 1 else ""
        match = UTT_ID.fullmatch(utt_id)
        if not match:
            raise DataError(
                f"{where}: bad utterance ID {utt_id!r}; expected {LINE_FORM} with digits"
            )
        if match.group(1, 2) != (speaker, chapter):
            raise DataError(
                f"{where}: utterance {utt_id} is not from this file's speaker and chapter; "
                f"expected an ID starting with {speaker}-{chapter}-"
            )
        if not words:
            raise DataError(f"{where}: no transcript after {utt_id}; expected {LINE_FORM}")
        if utt_id in transcript:
            raise DataError(
                f"{where}: {utt_id} already given on line {transcript[utt_id][1]}"
            )
        transcript[utt_id] = (words.upper(), lineno)

    if not transcript:
        raise DataError(f"{trans_path}: empty transcript; expected one {LINE_FORM} line per utterance")
    return transcript


def audio_duration(wav):
    """Duration in seconds from the header; checks the format and that the end is readable,
    with one opening of the file."""
    try:
        audio = soundfile.SoundFile(str(wav))
    except soundfile.SoundFileError as err:
        raise DataError(f"{wav}: unreadable audio file ({err})") from None
    with audio:
        if audio.samplerate != SAMPLE_RATE:
            raise DataError(f"{wav}: sample rate {audio.samplerate} Hz; expected {SAMPLE_RATE} Hz")
        if audio.channels != 1:
            raise DataError(f"{wav}: {audio.channels} channels; expected mono")
        if audio.frames == 0:
            raise DataError(f"{wav}: no samples; expected speech")
        check_end_readable(wav, audio)
        return audio.frames / audio.samplerate


def check_end_readable(wav, audio):
    """Reads the last sample of the open file: a file cut short (a copy that died half-way)
    keeps a header that promises every sample, so only reading the end tells. Seeking costs
    one FLAC block, not a decode of the whole file."""
    try:
        audio.seek(audio.frames - 1)
        if len(audio.read(1)) != 1:
            raise soundfile.SoundFileError("the last sample is missing")
    except (soundfile.SoundFileError, RuntimeError) as err:
        raise DataError(
            f"{wav}: truncated or corrupt audio: the header promises {audio.frames} samples but "
            f"the end cannot be read ({err}); copy the file again") from None


@contextmanager
def atomic_write(path):
    """Write through a temp file, so an interrupted run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "prepare",
        help="write SpeechBrain CSVs from a LibriSpeech-layout corpus",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--data-folder", required=True,
        help="the LibriSpeech folder, or a folder that contains LibriSpeech/",
    )
    parser.add_argument("--save-folder", required=True, help="where the CSVs go")
    parser.add_argument(
        "--splits", default=",".join(DEFAULT_SPLITS),
        help="comma-separated split names (default: %(default)s)",
    )
    parser.add_argument(
        "--max-duration", type=float, default=None,
        help="skip utterances longer than this many seconds (listed in <split>_skipped.txt)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args):
    splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    try:
        csv_paths = prepare_librispeech(
            args.data_folder, args.save_folder, splits=splits, max_duration=args.max_duration
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, path in csv_paths.items():
        print(f"{split}: {path}")
    return 0
