"""Scoring and the run's `results.json` (docs/FORMATS.md).

WER and CER come from jiwer; the per-utterance alignment file `wer_<split>.txt` is SpeechBrain's
`ErrorRateStats.write_stats` so that it reads like every SpeechBrain recipe's.
"""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import jiwer
from speechbrain.utils.metric_stats import ErrorRateStats

from conformer_prune.errors import InputError


def error_rates(references, hypotheses):
    """WER and CER in percent of word strings (empty hypotheses allowed, empty references not)."""
    for index, reference in enumerate(references):
        if not reference.strip():
            raise ValueError(f"error_rates: reference {index} is empty; WER is undefined for it")
    return {
        "wer": 100.0 * jiwer.wer(list(references), list(hypotheses)),
        "cer": 100.0 * jiwer.cer(list(references), list(hypotheses)),
    }


def write_alignments(path, ids, references, hypotheses):
    """Writes SpeechBrain's per-utterance alignment report for one split."""
    stats = ErrorRateStats()
    stats.append(ids, [h.split() for h in hypotheses], [r.split() for r in references])
    with open(path, "w", encoding="utf-8") as out:
        stats.write_stats(out)


def hparams_sha256(path):
    """Hash of the resolved hyperparameter file, so two results can be told apart exactly."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git_commit(repo_dir=None):
    """The commit the code ran at, or 'unknown' outside a git checkout; '+dirty' if modified."""
    repo_dir = repo_dir or Path(__file__).resolve().parent.parent
    try:
        commit = _git(repo_dir, "rev-parse", "HEAD")
        dirty = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _git(repo_dir, *args):
    return subprocess.run(
        ["git", *args], cwd=repo_dir, capture_output=True, text=True, check=True
    ).stdout.strip()


def write_results(path, results):
    """Writes results.json atomically (a killed run never leaves half a file)."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ResultsError(InputError):
    """A results.json that cannot be read as one JSON object; the message names the file."""


def read_results(path, missing_ok=False):
    """Reads results.json as a dict; with `missing_ok`, a file not written yet reads as {}.

    The one reader of results.json: `decode` (which merges into it) and `report` (which
    compares runs) both use it, so a bad file gets the same error everywhere.
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ResultsError(f"{path}: cannot read ({err.strerror})") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}: not valid JSON ({err.msg}, line {err.lineno} "
                           f"column {err.colno})") from None
    if not isinstance(results, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(results).__name__}")
    return results
