"""Offline speech corpus in LibriSpeech's layout, synthesised with espeak-ng and flite.

``conformer-prune synth-corpus --out DIR --hours H --seed S`` writes
``DIR/LibriSpeech/<split>/<speaker>/<chapter>/`` with FLAC files and ``trans.txt``
(docs/FORMATS.md), plus ``SPEAKERS.json`` and ``CORPUS.json``. docs/CORPUS.md explains
the voices, the text and the degradation of test-other.

The build has two halves. The planner (this process) draws every random choice from the
seed: the sentences, the speakers and every per-utterance parameter. The renderers
(a pool of worker processes) only run the synthesisers and the signal processing, each
with a generator seeded from its utterance id, so the audio does not depend on the
number of workers or the order in which they finish.
"""

import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile

from conformer_prune.progress import progress as progress_bar

SAMPLE_RATE = 16000
TRAIN_SPLIT = "train-clean-100"
EVAL_SPLITS = ("dev-clean", "test-clean", "test-other")
SPLITS = (TRAIN_SPLIT,) + EVAL_SPLITS
DEGRADED_SPLIT = "test-other"

FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Program listings, shell jokes and ASCII pictures: not sentences anyone would read aloud.
SKIPPED_FORTUNE_FILES = {"ascii-art", "translate-me", "perl", "linux", "linuxcookie",
                         "debian", "computers"}
# Beside LibriSpeech/, as a LibriSpeech user puts the LM corpus (openslr.org/11) there
LM_TEXT_FILE = "librispeech-lm-norm.txt"
DEFAULT_VOCAB_SIZE = 400  # a closed vocabulary that 1.5 h of speech covers many times over
MIN_WORDS, MAX_WORDS = 3, 15
# A sentence ending in one of these was cut at the abbreviation's full stop, not at its end.
ABBREVIATIONS = {"MR", "MRS", "MS", "DR", "ST", "JR", "SR", "VS", "ETC", "PROF", "GEN",
                 "COL", "CAPT", "LT", "SGT", "REV", "NO", "VOL", "CF", "IE", "EG"}

# espeak-ng's English dialects; the mbrola voices need packages we do not have.
ESPEAK_DIALECTS = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                   "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# whisper*: no voicing at all; Demonic: distorted; fast: a test copy of the default;
# caleb and klatt6 are byte-identical to klatt; "Mr serious" has a space in its name;
# Storm sets its own language (en-us), overriding the dialect.
EXCLUDED_VARIANTS = {"whisper", "whisperf", "Demonic", "fast", "caleb", "klatt6",
                     "Mr serious", "Storm"}
ESPEAK_AMPLITUDE = 70  # espeak's default of 100 clips with the louder variants
ESPEAK_DEFAULT_RATE = 175  # words per minute
# flite voices and the range of their base f0 in Hz (rms ignores the f0 target).
FLITE_VOICES = {"kal": (85, 130), "kal16": (85, 130), "awb": (90, 140),
                "rms": (85, 130), "slt": (150, 210)}
EVAL_VARIANT_FRACTION = 0.1  # of the usable variants, for each evaluation split
# Each variant speaks with two dialects, pitches and shifts: more voices per hour.
SPEAKERS_PER_VARIANT = 2
FLITE_TRAIN_SPEAKERS_PER_VOICE = 3
FLITE_EVAL_SPEAKERS = 3

JITTER = 0.07  # per-utterance relative change of rate and pitch
ESPEAK_PITCH_JITTER = 6  # on espeak's 0-99 pitch scale
PAD_SECONDS = (0.15, 0.45)  # silence before and after the speech, like LibriSpeech
MIN_SECONDS = 1.0
CLEAN_SNR_DB = (30.0, 50.0)  # a faint noise floor, so that no split has digital silence
OTHER_SNR_DB = (15.0, 20.0)
OTHER_RT60_S = (0.2, 0.5)
OTHER_DRR_DB = (4.0, 10.0)
NOISE_TILT = (0.5, 1.5)  # noise power spectrum ~ 1/f**tilt (1 = pink)
# Recording conditions (--condition). "studio": the clean splits get the faint floor and
# test-other the room and noise above. "far-field": every split is recorded across a noisier,
# more reverberant room; with the studio corpus's seed, vocabulary and eval hours it has the
# same speakers and evaluation sentences, so it is the domain that fine-tuned variants adapt
# to (docs/DELTA.md) and its test-clean is the studio test-clean heard from afar.
CONDITIONS = {
    "studio": None,
    "far-field": {"snr_db": (10.0, 15.0), "rt60_s": (0.3, 0.6), "drr_db": (2.0, 8.0)},
}

# Rough speaking time per character at espeak's default rate, measured on this corpus;
# it only sizes the plan, the summary reports the real durations.
SECONDS_PER_CHAR = 0.056
MIN_EVAL_UTTERANCES = 20
EVAL_FRACTION = 0.1
EVAL_POOL_SHARE = 0.15  # the most of the distinct sentences that one eval split may take
MIN_TRAIN_SENTENCES = 2  # every evaluation word occurs in at least this many train sentences


class CorpusError(RuntimeError):
    """The corpus on disk is incomplete or does not match its transcripts."""


# ---------------------------------------------------------------- text


def fortune_files(fortune_dir=FORTUNE_DIR):
    """The fortune files used as text (the .dat indexes and .u8 links excluded)."""
    return sorted(p for p in Path(fortune_dir).iterdir()
                  if p.is_file() and "." not in p.name and p.name not in SKIPPED_FORTUNE_FILES)


def split_sentences(text):
    """Raw sentences of a fortune file, attribution lines ("-- Author") removed."""
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    for fortune in re.split(r"\n%\n", text):
        lines = [line.strip() for line in fortune.split("\n") if not re.match(r"\s*--", line)]
        yield from re.split(r"(?<=[.!?])\s+", " ".join(lines))


def normalise(sentence):
    """UPPER CASE words of a sentence, or None when it would not be read as written.

    Digits, symbols, acronyms and abbreviations are rejected rather than expanded: the
    synthesiser's reading of them ("$200", "U.S.A.") would not match the transcript.
    """
    # Labels are not part of what is said: "Q: ... A: ..." dialogues, "(a) ..." lists.
    sentence = re.sub(r"^\s*(?:[QA]:|\([A-Za-z]\))\s*", "", sentence or "")
    if not sentence or re.search(r"[^A-Za-z\s.,;:!?'\"()\-]", sentence):
        return None
    if re.search(r"\b[A-Z]{2,}\b", sentence) or re.search(r"[A-Za-z]\.[A-Za-z]", sentence):
        return None
    words = [w.strip("'") for w in re.sub(r"[^A-Za-z']", " ", sentence).upper().split()]
    words = [w for w in words if w]
    if not words:
        return None
    last = words[-1]
    if last in ABBREVIATIONS or (len(last) == 1 and last not in ("A", "I")):
        return None
    return " ".join(words)


def select_sentences(sentences, vocab_size, min_words=MIN_WORDS, max_words=MAX_WORDS):
    """Distinct sentences whose words are all among the ``vocab_size`` most frequent.

    Returns ``(kept sentences sorted, vocabulary set)``. Frequencies are counted over the
    distinct sentences; ties are broken alphabetically so the vocabulary is reproducible.
    """
    distinct = sorted(set(sentences))
    counts = Counter(w for s in distinct for w in s.split())
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = set(ranked[:vocab_size])
    kept = [s for s in distinct
            if min_words <= len(s.split()) <= max_words and all(w in vocab for w in s.split())]
    return kept, vocab


def normalised_sentences(fortune_dir=FORTUNE_DIR):
    """Every sentence of the fortune files that normalise() keeps, in file order."""
    normalised = []
    for path in fortune_files(fortune_dir):
        for raw in split_sentences(path.read_text(encoding="utf-8", errors="replace")):
            sentence = normalise(raw.strip())
            if sentence:
                normalised.append(sentence)
    return normalised


def load_text(vocab_size, fortune_dir=FORTUNE_DIR):
    """The sentence pool and a description of where it came from (for CORPUS.json)."""
    files = fortune_files(fortune_dir)
    normalised = normalised_sentences(fortune_dir)
    kept, _ = select_sentences(normalised, vocab_size)
    if not kept:
        raise CorpusError(f"no usable sentences in {fortune_dir}: is the 'fortunes' package "
                          "installed?")
    used_words = {w for s in kept for w in s.split()}
    source = {"source": "Debian fortune cookie files (packages fortunes, fortunes-min)",
              "directory": str(fortune_dir), "files": [p.name for p in files],
              "vocab_size": vocab_size, "words_used": len(used_words),
              "candidate_sentences": len(set(normalised)), "sentences": len(kept),
              "words_per_sentence": [MIN_WORDS, MAX_WORDS]}
    return kept, source


def spoken_text(transcript):
    """What the synthesiser reads: lower case, so that no word is spelled out as an
    acronym, except the pronoun I."""
    return re.sub(r"\bi\b", "I", transcript.lower())


# ---------------------------------------------------------------- voices


def _command_output(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise CorpusError(f"{cmd[0]} is not installed (Debian: apt-get install espeak-ng "
                          "flite sox)") from None


def available_dialects():
    listed = set(re.findall(r"^\s*\d+\s+(\S+)\s", _command_output(["espeak-ng", "--voices=en"]),
                            re.MULTILINE))
    return [d for d in ESPEAK_DIALECTS if d in listed]


def available_variants():
    data = re.search(r"Data at:\s*(\S+)", _command_output(["espeak-ng", "--version"])).group(1)
    found = [p.name for p in (Path(data) / "voices" / "!v").iterdir() if p.is_file()]
    return sorted(v for v in found if v not in EXCLUDED_VARIANTS)


def available_flite_voices():
    listed = _command_output(["flite", "-lv"]).split(":", 1)[-1].split()
    return [v for v in FLITE_VOICES if v in listed]


def _espeak_speaker(rng, dialect, variant):
    return {"engine": "espeak-ng", "voice": dialect, "variant": variant,
            "pitch": int(rng.integers(25, 76)), "pitch_unit": "espeak 0-99",
            "rate": int(rng.integers(140, 196)), "rate_unit": "words per minute",
            "word_gap": int(rng.integers(0, 3)), **_channel(rng)}


def _flite_speaker(rng, voice):
    low, high = FLITE_VOICES[voice]
    return {"engine": "flite", "voice": voice, "variant": None,
            "pitch": round(float(rng.uniform(low, high)), 1), "pitch_unit": "f0 Hz",
            "rate": round(float(rng.uniform(0.85, 1.2)), 3), "rate_unit": "duration_stretch",
            **_channel(rng)}


def _channel(rng):
    """What sox and the mixer do to a speaker: a pitch and formant shift (a longer or
    shorter vocal tract, which the synthesisers' own pitch setting does not change),
    a spectral tilt and a recording level."""
    return {"shift_cents": int(rng.integers(-200, 201)),
            "bass_db": round(float(rng.uniform(-4, 4)), 1),
            "treble_db": round(float(rng.uniform(-4, 4)), 1),
            "level_db": round(float(rng.uniform(-28, -20)), 1)}


def make_speakers(seed, dialects, variants, flite_voices):
    """The speakers of every split, in the order in which they get utterances.

    Each espeak-ng variant belongs to exactly one split (as two speakers with different
    dialects), so dev and test voices are variants never heard in training, spoken with
    the dialects training also has.
    Held-out flite speakers reuse the flite voices with new pitch, rate and shift.
    """
    rng = np.random.default_rng([seed, 1])
    variants = list(variants)
    rng.shuffle(variants)
    n_eval = max(1, round(EVAL_VARIANT_FRACTION * len(variants)))
    variant_sets = {split: variants[i * n_eval:(i + 1) * n_eval]
                    for i, split in enumerate(EVAL_SPLITS)}
    variant_sets[TRAIN_SPLIT] = variants[len(EVAL_SPLITS) * n_eval:]

    speakers = {}
    for split in SPLITS:
        order = list(dialects)
        rng.shuffle(order)
        slots = [v for v in variant_sets[split] for _ in range(SPEAKERS_PER_VARIANT)]
        split_speakers = [_espeak_speaker(rng, order[i % len(order)], variant)
                          for i, variant in enumerate(slots)]
        if split == TRAIN_SPLIT:
            voices = [v for v in flite_voices for _ in range(FLITE_TRAIN_SPEAKERS_PER_VOICE)]
        else:
            voices = list(rng.choice(flite_voices, FLITE_EVAL_SPEAKERS, replace=False))
        split_speakers += [_flite_speaker(rng, str(v)) for v in voices]
        rng.shuffle(split_speakers)
        speakers[split] = split_speakers

    total = sum(len(s) for s in speakers.values())
    ids = iter(rng.choice(np.arange(100, 9000), total, replace=False))
    chapters = iter(rng.choice(np.arange(1000, 300000), total, replace=False))
    for split, split_speakers in speakers.items():
        for speaker in split_speakers:
            speaker.update(id=int(next(ids)), chapter=int(next(chapters)), split=split)
    return speakers


# ---------------------------------------------------------------- plan


def _speed(speaker):
    if speaker["engine"] == "espeak-ng":
        return speaker["rate"] / ESPEAK_DEFAULT_RATE
    return 1.0 / speaker["rate"]


def estimate_seconds(transcript, speed=1.0):
    return len(transcript) * SECONDS_PER_CHAR / speed + sum(PAD_SECONDS)


def assign_sentences(pool, speakers, hours, eval_hours):
    """Sentences and speakers per split: ``{split: [(transcript, speaker), ...]}``.

    Evaluation splits take disjoint blocks of sentences from the front of the shuffled
    pool and training takes the rest, so no dev or test sentence is ever trained on; an
    evaluation sentence is only taken if each of its words stays in at least
    ``MIN_TRAIN_SENTENCES`` training sentences (a closed vocabulary: test errors measure
    recognition, not unseen words). When a split needs more utterances than its block has
    sentences, it goes round its block again with the next speaker. Also returns the
    number of rounds per split.
    """
    mean_seconds = np.mean([estimate_seconds(s) for s in pool])
    if eval_hours is None:
        eval_seconds = max(EVAL_FRACTION * hours * 3600, MIN_EVAL_UTTERANCES * mean_seconds)
    else:
        eval_seconds = eval_hours * 3600
    wanted = max(1, round(eval_seconds / mean_seconds))
    blocks = closed_vocabulary_blocks(pool, len(EVAL_SPLITS),
                                      min(wanted, max(1, int(EVAL_POOL_SHARE * len(pool)))))
    assigned, rounds = {}, {}
    for split, block in zip(EVAL_SPLITS, blocks):
        assigned[split], rounds[split] = _fill(block, speakers[split], eval_seconds)
    taken = {s for block in blocks for s in block}
    assigned[TRAIN_SPLIT], rounds[TRAIN_SPLIT] = _fill(
        [s for s in pool if s not in taken], speakers[TRAIN_SPLIT], hours * 3600)
    return assigned, rounds


def closed_vocabulary_blocks(pool, n_blocks, block_size):
    """``n_blocks`` disjoint blocks of up to ``block_size`` sentences, in pool order, each
    sentence's words left in at least ``MIN_TRAIN_SENTENCES`` of the untaken sentences."""
    left = Counter(w for s in pool for w in set(s.split()))
    blocks = [[] for _ in range(n_blocks)]
    for sentence in pool:
        open_blocks = [block for block in blocks if len(block) < block_size]
        if not open_blocks:
            break
        words = set(sentence.split())
        if all(left[w] - 1 >= MIN_TRAIN_SENTENCES for w in words):
            left.subtract(words)
            open_blocks[0].append(sentence)
    return blocks


def _fill(block, speakers, seconds):
    """Utterances from ``block`` until their estimated duration reaches ``seconds``."""
    if not block:
        raise CorpusError("the sentence pool is too small; raise the vocabulary size")
    utterances, total, i = [], 0.0, 0
    while total < seconds or not utterances:
        rounds, j = divmod(i, len(block))
        # Shift by the round so that a reused sentence gets a different voice.
        speaker = speakers[(i + rounds) % len(speakers)]
        utterances.append((block[j], speaker))
        total += estimate_seconds(block[j], _speed(speaker))
        i += 1
    return utterances, (len(utterances) - 1) // len(block) + 1


def plan_jobs(root, assigned, seed, condition="studio"):
    """Per-utterance jobs (everything a renderer needs) and the speakers in use."""
    rng = np.random.default_rng([seed, 2])
    jobs, used = [], {}
    for split in SPLITS:
        counters = {}
        for transcript, speaker in assigned[split]:
            number = counters.get(speaker["id"], 0)
            counters[speaker["id"]] = number + 1
            used[speaker["id"]] = speaker
            utt_id = f"{speaker['id']}-{speaker['chapter']}-{number:04d}"
            path = root / split / str(speaker["id"]) / str(speaker["chapter"]) / f"{utt_id}.flac"
            jobs.append(_job(rng, seed, split, utt_id, path, transcript, speaker,
                             room_of(split, condition)))
    return jobs, used


def room_of(split, condition):
    """The ranges of SNR (dB), RT60 (s) and DRR (dB) a split is recorded with; RT60 and DRR
    None: no reverberation."""
    if condition not in CONDITIONS:
        raise CorpusError(f"condition {condition!r}: expected one of {', '.join(CONDITIONS)}")
    if CONDITIONS[condition]:
        return CONDITIONS[condition]
    if split == DEGRADED_SPLIT:
        return {"snr_db": OTHER_SNR_DB, "rt60_s": OTHER_RT60_S, "drr_db": OTHER_DRR_DB}
    return {"snr_db": CLEAN_SNR_DB, "rt60_s": None, "drr_db": None}


def _job(rng, seed, split, utt_id, path, transcript, speaker, room):
    jitter = float(rng.uniform(1 - JITTER, 1 + JITTER))
    if speaker["engine"] == "espeak-ng":
        pitch = int(np.clip(speaker["pitch"] + rng.integers(-ESPEAK_PITCH_JITTER,
                                                           ESPEAK_PITCH_JITTER + 1), 0, 99))
        rate = round(speaker["rate"] * jitter)
    else:
        pitch = round(speaker["pitch"] * float(rng.uniform(1 - JITTER, 1 + JITTER)), 1)
        rate = round(speaker["rate"] * jitter, 3)
    reverberant = room["rt60_s"] is not None
    return {"utt_id": utt_id, "split": split, "path": str(path), "transcript": transcript,
            "text": spoken_text(transcript), "engine": speaker["engine"],
            "voice": speaker["voice"], "variant": speaker["variant"], "pitch": pitch,
            "rate": rate, "word_gap": speaker.get("word_gap", 0),
            "shift_cents": speaker["shift_cents"], "bass_db": speaker["bass_db"],
            "treble_db": speaker["treble_db"],
            "level_db": speaker["level_db"] + float(rng.uniform(-1.5, 1.5)),
            "pad": [float(rng.uniform(*PAD_SECONDS)) for _ in range(2)],
            "snr_db": float(rng.uniform(*room["snr_db"])),
            "noise_tilt": float(rng.uniform(*NOISE_TILT)),
            "rt60_s": float(rng.uniform(*room["rt60_s"])) if reverberant else None,
            "drr_db": float(rng.uniform(*room["drr_db"])) if reverberant else None,
            "seed": [seed, zlib.crc32(utt_id.encode())]}


# ---------------------------------------------------------------- audio


def synthesise(job, wav_path):
    """Run the job's synthesiser into ``wav_path`` (its native rate)."""
    if job["engine"] == "espeak-ng":
        cmd = ["espeak-ng", "-v", f"{job['voice']}+{job['variant']}", "-p", str(job["pitch"]),
               "-s", str(job["rate"]), "-a", str(ESPEAK_AMPLITUDE), "-g", str(job["word_gap"]),
               "-w", wav_path, job["text"]]
    else:
        cmd = ["flite", "-voice", job["voice"],
               "--setf", f"duration_stretch={job['rate']}",
               "--setf", f"int_f0_target_mean={job['pitch']}",
               "-t", job["text"], "-o", wav_path]
    subprocess.run(cmd, capture_output=True, check=True)


def to_16k(job, wav_path):
    """sox: resample to 16 kHz mono float with the speaker's shift and tilt applied."""
    cmd = ["sox", "-D", wav_path, "-t", "raw", "-e", "floating-point", "-b", "32",
           "-r", str(SAMPLE_RATE), "-c", "1", "-",
           "gain", "-10",  # headroom: sox clips at full scale and bass/treble can boost
           "pitch", str(job["shift_cents"]),
           "bass", str(job["bass_db"]), "treble", str(job["treble_db"])]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(out, dtype=np.float32).astype(np.float64)


def trim(x, floor_db=-40.0, frame=SAMPLE_RATE // 100):
    """Cut the synthesiser's leading and trailing silence (frames 40 dB below the peak)."""
    n = len(x) // frame
    energy = (x[:n * frame].reshape(n, frame) ** 2).mean(axis=1)
    loud = np.flatnonzero(energy > energy.max() * 10 ** (floor_db / 10))
    return x[loud[0] * frame:(loud[-1] + 1) * frame]


def coloured_noise(rng, n, tilt):
    """Gaussian noise with power spectrum ~ 1/f**tilt, unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    spectrum[1:] /= freqs[1:] ** (tilt / 2)
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / np.sqrt(np.mean(noise ** 2))


def reverberate(rng, x, rt60, drr_db):
    """Convolve with a synthetic room: a direct path plus an exponentially decaying
    noise tail (``rt60`` seconds to -60 dB, tail energy ``drr_db`` below the direct)."""
    length = int(rt60 * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.standard_normal(length) * np.exp(-6.9078 * t / rt60)
    tail[:int(0.003 * SAMPLE_RATE)] = 0  # the first reflection arrives a little late
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail ** 2))
    tail[0] = 1.0
    size = len(x) + length - 1
    wet = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(tail, size), size)
    return wet[:len(x)]


def render(job):
    """The finished 16 kHz int16 signal of one utterance."""
    rng = np.random.default_rng(job["seed"])
    with tempfile.TemporaryDirectory(prefix="synth-") as tmp:
        wav_path = os.path.join(tmp, "raw.wav")
        synthesise(job, wav_path)
        speech = trim(to_16k(job, wav_path))
    speech *= 10 ** (job["level_db"] / 20) / np.sqrt(np.mean(speech ** 2))
    lead, trail = (int(p * SAMPLE_RATE) for p in job["pad"])
    trail = max(trail, int(MIN_SECONDS * SAMPLE_RATE) - lead - len(speech))
    x = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    active = slice(lead, lead + len(speech))
    if job["rt60_s"]:
        x = reverberate(rng, x, job["rt60_s"], job["drr_db"])
    # The SNR is measured against the speech region, not the padded utterance.
    speech_power = np.mean(x[active] ** 2)
    noise = coloured_noise(rng, len(x), job["noise_tilt"])
    x = x + noise * np.sqrt(speech_power * 10 ** (-job["snr_db"] / 10))
    peak = np.abs(x).max()
    if peak > 0.99:
        x *= 0.99 / peak
    return np.round(x * 32767).astype(np.int16)


def is_valid_flac(path):
    try:
        info = soundfile.info(str(path))
    except RuntimeError:  # soundfile's LibsndfileError: missing or unreadable
        return False
    return (info.format == "FLAC" and info.samplerate == SAMPLE_RATE
            and info.channels == 1 and info.frames > 0)


def render_to_file(job):
    """Worker entry point: write the job's FLAC atomically (a killed build leaves no
    half-written file that a rerun would keep)."""
    audio = render(job)
    partial = job["path"] + ".part"
    soundfile.write(partial, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(partial, job["path"])


def run_jobs(jobs, workers, progress):
    bar = progress_bar(len(jobs), "synth-corpus", unit="utt", enabled=progress)
    if workers <= 1:
        for job in jobs:
            render_to_file(job)
            bar.update()
    else:
        # spawn, not fork: the parent may hold threads (torch) that fork would copy mid-lock.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(render_to_file, jobs, chunksize=4):
                bar.update()
    bar.close()


# ---------------------------------------------------------------- files


def write_transcripts(jobs):
    by_file = {}
    for job in jobs:
        path = Path(job["path"])
        chapter_file = path.parent / f"{path.parent.parent.name}-{path.parent.name}.trans.txt"
        by_file.setdefault(chapter_file, []).append(f"{job['utt_id']} {job['transcript']}")
    for path, lines in by_file.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(sorted(lines)) + "\n")


def write_lm_text(path, jobs, fortune_dir=FORTUNE_DIR):
    """The language-model text of the corpus, LibriSpeech's librispeech-lm-norm.txt in kind:
    every distinct normalised fortune sentence (any vocabulary, any length) except the
    transcripts of the evaluation splits, one per line, sorted. Train transcripts stay in (the
    LM recipe reads them anyway); no dev or test sentence can reach the LM. Written only when
    its text changes; returns {"file", "sentences", "excluded_eval_sentences"}."""
    held_out = {job["transcript"] for job in jobs if job["split"] != TRAIN_SPLIT}
    sentences = sorted(set(normalised_sentences(fortune_dir)) - held_out)
    text = "\n".join(sentences) + "\n"
    path = Path(path)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    return {"file": path.name, "sentences": len(sentences),
            "excluded_eval_sentences": len(held_out)}


def write_json(path, data):
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def plan_digest(jobs):
    """A fingerprint of everything that decides the audio (paths aside, so that a
    corpus folder can be moved)."""
    fields = [{k: v for k, v in job.items() if k != "path"} for job in jobs]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def check_same_plan(corpus_json, digest):
    """Refuse to finish another corpus's folder: its kept files would not match the new
    transcripts. The plan changes with the seed, the sizes, the vocabulary, and with the
    installed voices, fortune files or this builder's code."""
    if corpus_json.exists():
        old = json.loads(corpus_json.read_text())
        if old.get("plan_sha256") != digest:
            raise CorpusError(f"{corpus_json.parent} holds a different corpus (recipe "
                              f"{old.get('recipe')}); use another --out")


def validate(root):
    """Check every split on disk and return the per-split summary.

    Every transcript line must have its 16 kHz mono FLAC and every FLAC its line.
    """
    problems, summary = [], {}
    for split in SPLITS:
        utterances, seconds, speakers = 0, 0.0, set()
        listed = set()
        for trans in sorted((root / split).glob("*/*/*.trans.txt")):
            for line in trans.read_text().splitlines():
                utt_id, _, words = line.partition(" ")
                flac = trans.parent / f"{utt_id}.flac"
                listed.add(flac)
                if not words.strip():
                    problems.append(f"{trans}: no words for {utt_id}")
                elif not is_valid_flac(flac):
                    problems.append(f"{flac}: missing, empty or not 16 kHz mono FLAC")
                else:
                    utterances += 1
                    seconds += soundfile.info(str(flac)).duration
                    speakers.add(utt_id.split("-")[0])
        problems += [f"{f}: not in any trans.txt"
                     for f in sorted(set((root / split).glob("*/*/*.flac")) - listed)]
        if not listed:
            problems.append(f"{root / split}: no transcripts")
        summary[split] = {"utterances": utterances, "speakers": len(speakers),
                          "seconds": round(seconds, 2)}
    if problems:
        shown = "\n  ".join(problems[:10])
        raise CorpusError(f"{len(problems)} problem(s) in {root}:\n  {shown}")
    return summary


def degradation_description(condition="studio"):
    """CORPUS.json's `degradation`: the room and noise of the degraded splits (test-other in
    the studio condition, every split otherwise)."""
    every_split = bool(CONDITIONS.get(condition))
    room = room_of(DEGRADED_SPLIT, condition)
    description = {
        "condition": condition, "split": "all" if every_split else DEGRADED_SPLIT,
        "reverberation": {"kind": "synthetic room impulse response: direct path plus "
                                  "exponentially decaying Gaussian tail",
                          "rt60_seconds": list(room["rt60_s"]),
                          "direct_to_reverberant_db": list(room["drr_db"])},
        "noise": {"kind": "Gaussian noise with power spectrum 1/f**tilt",
                  "tilt": list(NOISE_TILT), "snr_db": list(room["snr_db"]),
                  "snr_reference": "mean power of the (reverberant) speech region"},
        "per_utterance": "uniform draws from the ranges, fixed by the seed"}
    if not every_split:
        description["clean_splits_noise_floor_snr_db"] = list(CLEAN_SNR_DB)
    return description


def plan_corpus(root, hours, seed, eval_hours, vocab_size, condition):
    """Every utterance's job, the speakers in use, the sentence rounds per split and the text
    description: everything drawn from the seed, nothing rendered."""
    sentences, text = load_text(vocab_size)
    pool = list(sentences)
    np.random.default_rng([seed, 0]).shuffle(pool)
    speakers = make_speakers(seed, available_dialects(), available_variants(),
                             available_flite_voices())
    assigned, rounds = assign_sentences(pool, speakers, hours, eval_hours)
    jobs, used = plan_jobs(root, assigned, seed, condition)
    return jobs, used, rounds, text


def build_corpus(out_dir, hours, seed=1234, eval_hours=None, workers=2, progress=True,
                 vocab_size=DEFAULT_VOCAB_SIZE, condition="studio"):
    """Build (or finish building) the corpus under ``out_dir/LibriSpeech``.

    ``hours`` sizes train-clean-100; ``eval_hours`` each of dev-clean, test-clean and
    test-other (default: 10% of ``hours``, but at least about 20 utterances). Durations
    are planned from a per-character estimate, so the real hours differ a little.
    ``condition`` is the recording condition (CONDITIONS).
    Returns ``{split: {"utterances", "speakers", "seconds"}}``.
    """
    room_of(TRAIN_SPLIT, condition)  # an unknown condition fails before anything is written
    root = Path(out_dir) / "LibriSpeech"
    root.mkdir(parents=True, exist_ok=True)

    jobs, used, rounds, text = plan_corpus(root, hours, seed, eval_hours, vocab_size, condition)
    digest = plan_digest(jobs)
    check_same_plan(root / "CORPUS.json", digest)

    recipe = {"seed": seed, "hours": hours, "eval_hours": eval_hours, "vocab_size": vocab_size,
              "condition": condition}
    corpus = {"recipe": recipe, "plan_sha256": digest, "sample_rate": SAMPLE_RATE,
              "complete": False,
              "text": {**text, "sentence_rounds": rounds,
                       "note": "eval splits use disjoint sentences never used in training; "
                               "a split whose rounds exceed 1 reuses its sentences with "
                               "other voices"},
              "degradation": degradation_description(condition)}
    write_json(root / "CORPUS.json", corpus)
    write_json(root / "SPEAKERS.json", {str(k): used[k] for k in sorted(used)})
    write_transcripts(jobs)
    corpus["text"]["lm_text"] = write_lm_text(Path(out_dir) / LM_TEXT_FILE, jobs)

    pending = [job for job in jobs if not is_valid_flac(job["path"])]
    run_jobs(pending, workers, progress)

    summary = validate(root)
    corpus.update(complete=True, summary=summary)
    write_json(root / "CORPUS.json", corpus)
    return summary


# ---------------------------------------------------------------- command line


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "synth-corpus", help="synthesise a small LibriSpeech-layout corpus offline",
        description="Synthesise a LibriSpeech-layout corpus with espeak-ng and flite "
                    "(docs/CORPUS.md).")
    parser.add_argument("--out", required=True, help="output folder (gets LibriSpeech/)")
    parser.add_argument("--hours", type=float, default=1.5, help="hours of train-clean-100")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--eval-hours", type=float, default=None,
                        help="hours of each dev/test split (default: 10%% of --hours, "
                             "at least ~20 utterances)")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="keep sentences made of the N most frequent words")
    parser.add_argument("--condition", choices=sorted(CONDITIONS), default="studio",
                        help="recording condition: studio (test-other degraded) or far-field "
                             "(every split; the fine-tuning domain of docs/DELTA.md)")
    parser.set_defaults(func=run)
    return parser


def run(args):
    start = time.time()
    summary = build_corpus(args.out, args.hours, seed=args.seed, eval_hours=args.eval_hours,
                           workers=args.workers, vocab_size=args.vocab_size,
                           condition=args.condition)
    print(f"{'split':<16} {'utterances':>10} {'speakers':>9} {'hours':>7}")
    for split, row in summary.items():
        print(f"{split:<16} {row['utterances']:>10} {row['speakers']:>9} "
              f"{row['seconds'] / 3600:>7.3f}")
    print(f"built {Path(args.out) / 'LibriSpeech'} in {time.time() - start:.0f} s")
    return 0

