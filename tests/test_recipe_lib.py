"""recipes/lib.sh's decisions: which finished runs a recipe skips, decodes again, or refuses.
`conformer-prune` is replaced by a stand-in that logs its call and exits as told, so these tests
check the shell's dispatch, not check-run itself (tests/test_reliability.py does that)."""

import os
import subprocess
import time

import pytest

from tiny_runs import ROOT


def _lib(tmp_path, script, check_run_status=0):
    """Runs `script` after sourcing lib.sh in tmp_path; the stand-in logs to calls.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "conformer-prune"
    stand_in.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {tmp_path}/calls.txt\n'
        f'[ "$1" = check-run ] && {{ echo "check-run said"; exit {check_run_status}; }}\n'
        "exit 0\n")
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CORPUS": "corpus"}
    return subprocess.run(["bash", "-c", f"source {ROOT}/recipes/lib.sh; {script}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def _finished(tmp_path, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text("{}")
    return run


@pytest.mark.parametrize("status, says", [(0, "done"), (3, "not done")])
def test_is_done_skips_a_run_as_asked_and_decodes_again_one_searched_otherwise(
        tmp_path, status, says):
    _finished(tmp_path)
    asked = 'if is_done run y.yaml --seed 1; then echo done; else echo "not done"; fi'
    done = _lib(tmp_path, asked, check_run_status=status)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == says
    assert ("check-run said" in done.stdout) == (status == 3)  # says why it decodes again
    assert (tmp_path / "calls.txt").read_text() == "check-run run y.yaml --seed 1\n"


def test_is_done_stops_the_recipe_on_a_run_trained_otherwise(tmp_path):
    _finished(tmp_path)
    stopped = _lib(tmp_path, "is_done run y.yaml; echo still running", check_run_status=1)
    assert stopped.returncode == 1
    assert "FAILED: run is finished but was trained with other settings" in stopped.stdout
    assert "still running" not in stopped.stdout


def test_is_done_without_results_asks_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    done = _lib(tmp_path, 'is_done run y.yaml || echo "not done"')
    assert done.stdout.strip() == "not done" and not (tmp_path / "calls.txt").exists()


def test_shrink_and_decode_decodes_the_compact_model_again_after_its_run(tmp_path):
    run = _finished(tmp_path)
    (run / "compact").mkdir()
    (run / "compact" / "results.json").write_text("{}")
    skipped = _lib(tmp_path, "shrink_and_decode run")
    assert "run/compact: decoded (results.json), skipped" in skipped.stdout
    (run / "results.json").write_text("{}")  # the run decoded again with other search settings
    os.utime(run / "results.json", (time.time() + 5, time.time() + 5))
    again = _lib(tmp_path, "shrink_and_decode run")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "calls.txt").read_text().splitlines()[-1] == \
        "decode run/compact --data-folder corpus"


def test_train_queue_runs_train_py_again_on_a_run_searched_otherwise_and_keeps_its_log(tmp_path):
    # train.py stand-in: says what it was given and finishes the run (results.json)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text('#!/usr/bin/env bash\necho "train.py said: $*"\n'
                      'mkdir -p results/name/1 && echo {} > results/name/1/results.json\n')
    python.chmod(0o755)
    first = _lib(tmp_path, "train_queue '1 y.yaml name --lr 0.1'")
    assert first.returncode == 0, first.stdout + first.stderr
    again = _lib(tmp_path, "train_queue '1 y.yaml name --lr 0.1'", check_run_status=3)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "check-run said" in again.stdout
    log = (tmp_path / "results" / "name_1.log").read_text().splitlines()
    command = "train.py y.yaml --data_folder corpus --seed 1 --experiment_name name --lr 0.1"
    said = [line for line in log if not line.startswith("=== ")]
    assert said == [f"train.py said: {command}"] * 2  # the first attempt's log is kept
    assert sum(line.startswith("=== ") and line.endswith(f"python {command}") for line in log) == 2
    done = _lib(tmp_path, "train_queue '1 y.yaml name --lr 0.1'")  # check-run: as asked
    assert "results/name/1: done (results.json), skipped" in done.stdout
