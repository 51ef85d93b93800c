"""Tests of scoring and the results.json reader and writer (conformer_prune/scoring.py)."""

import subprocess

import pytest

from conformer_prune.scoring import (
    ResultsError,
    error_rates,
    git_commit,
    read_results,
    write_alignments,
    write_results,
)


def test_error_rates_by_hand():
    # One substitution in 4 words; 1 substituted character in 15 (spaces count).
    rates = error_rates(["THE CAT SAT DOWN"], ["THE CAT SAT TOWN"])
    assert rates["wer"] == pytest.approx(25.0)
    assert rates["cer"] == pytest.approx(100.0 / 16)


def test_error_rates_allow_empty_hypotheses_but_not_references():
    assert error_rates(["A B"], [""])["wer"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="reference 1 is empty"):
        error_rates(["A B", " "], ["A B", ""])


def test_alignment_file_is_speechbrains(tmp_path):
    path = tmp_path / "wer_test.txt"
    write_alignments(path, ["u1", "u2"], ["A B C", "D E"], ["A X C", "D E"])
    text = path.read_text()
    assert "%WER 20.00 [ 1 / 5, 0 ins, 0 del, 1 sub ]" in text
    assert "u1, %WER 33.33" in text


def test_results_round_trip_and_atomic_write(tmp_path):
    path = tmp_path / "results.json"
    write_results(path, {"params": {"total": 3}, "splits": {}})
    assert read_results(path) == {"params": {"total": 3}, "splits": {}}
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_results_only_read_as_empty_when_allowed(tmp_path):
    assert read_results(tmp_path / "results.json", missing_ok=True) == {}
    with pytest.raises(ResultsError, match="results.json: cannot read"):
        read_results(tmp_path / "results.json")


@pytest.mark.parametrize("text, message", [
    ('{"wer": ', "not valid JSON (Expecting value, line 1 column 9)"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_bad_results_name_the_file(tmp_path, text, message):
    path = tmp_path / "results.json"
    path.write_text(text)
    with pytest.raises(ResultsError) as err:
        read_results(path, missing_ok=True)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_git_commit_marks_a_modified_checkout(tmp_path):
    assert git_commit(tmp_path) == "unknown"  # not a checkout
    run = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True,  # noqa: E731
                                       capture_output=True)
    run("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    run("add", "f.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = git_commit(tmp_path)
    assert len(clean) == 40
    (tmp_path / "f.txt").write_text("2")
    assert git_commit(tmp_path) == clean + "+dirty"
