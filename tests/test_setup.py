"""The set-up installs one tested stack: exact pins, a full constraints file, a clear stack check."""

import configparser
import io
import re
from pathlib import Path

from conformer_prune import stack_check
from conformer_prune.progress import LineProgress, progress

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"


def setup_cfg_requirements():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].split("\n")
    lines += config["options.extras_require"]["dev"].split("\n")
    return [line.strip() for line in lines if line.strip()]


def constraint_pins():
    pins = {}
    for number, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        assert match, f"{CONSTRAINTS}:{number}: expected name==version, got {line!r}"
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_torch_pair_and_speechbrain_are_pinned_exactly():
    pins = dict(re.fullmatch(r"([\w\-]+)(.*)", r).groups() for r in setup_cfg_requirements())
    assert pins["torch"] == "==2.11.0"
    assert pins["torchaudio"] == "==2.11.0"
    assert pins["speechbrain"].startswith("==")


def test_every_direct_requirement_is_bounded_above_and_in_the_constraints():
    """A new major release of any direct dependency cannot enter without a commit."""
    pins = constraint_pins()
    for requirement in setup_cfg_requirements():
        name, spec = re.fullmatch(r"([\w\-]+)(.*)", requirement).groups()
        assert "==" in spec or "<" in spec, f"setup.cfg: {requirement} has no upper bound"
        assert canonical(name) in pins, f"{CONSTRAINTS}: {name} is not pinned"


def test_constraints_pin_the_setup_cfg_versions():
    from packaging.specifiers import SpecifierSet

    pins = constraint_pins()
    for requirement in setup_cfg_requirements():
        name, spec = re.fullmatch(r"([\w\-]+)(.*)", requirement).groups()
        assert pins[canonical(name)] in SpecifierSet(spec), (
            f"{CONSTRAINTS}: {name}=={pins[canonical(name)]} is outside setup.cfg's {spec}")


def test_constraints_match_what_is_installed():
    """The file was written from a tested installation, and this one is the same."""
    from importlib import metadata

    for name, version in constraint_pins().items():
        have = metadata.version(name)
        assert have == version, f"{name}: installed {have}, constraints.txt pins {version}"


def test_stack_check_names_the_mismatched_pair():
    installed = {"torch": "2.11.0", "torchaudio": "2.11.1", "speechbrain": "1.1.2"}.get
    pins = {"torch": "2.11.0", "torchaudio": "2.11.0", "speechbrain": "1.1.2"}
    problems = stack_check.version_problems(pins, installed)
    assert problems == ["torchaudio 2.11.1 is installed but torchaudio==2.11.0 is the tested "
                        "version"]
    assert stack_check.pair_text(installed) == "torch 2.11.0 with torchaudio 2.11.1"


def test_stack_check_accepts_a_local_version_tag_and_reports_missing():
    installed = {"torch": "2.11.0+cu130"}.get
    problems = stack_check.version_problems({"torch": "2.11.0", "jiwer": "4.0.0"}, installed)
    assert problems == ["jiwer is not installed (needs jiwer==4.0.0)"]


def test_stack_check_reports_a_failing_import_in_one_line():
    problem = stack_check.import_problem(["json", "no_such_module_here"])
    assert problem.startswith("import no_such_module_here failed: ModuleNotFoundError")
    assert "\n" not in problem
    assert stack_check.import_problem(["json"]) is None


def test_stack_check_passes_on_this_installation(capsys):
    assert stack_check.main([]) == 0
    assert "imports fine" in capsys.readouterr().out


# ----- progress in log files -------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_line_progress_writes_whole_lines_by_percent_and_time():
    stream, clock = io.StringIO(), FakeClock()
    bar = LineProgress(200, "synth-corpus", "utt", stream, every_seconds=30, every_percent=25,
                       clock=clock)
    for step in range(200):
        clock.now += 0.1
        bar.update()
    # a fast loop: 200 updates in 0.2 s print nothing until the closing line
    fast = LineProgress(200, "prepare", "file", io.StringIO(), every_seconds=30,
                        every_percent=10, clock=FakeClock())
    for _ in range(200):
        fast.update()
    fast.close()
    assert len(fast.stream.getvalue().splitlines()) == 1
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    # 25%, 50%, 75%, 100% by percent, then the closing line
    assert [line.split(":")[1].split()[0] for line in lines] == [
        "50/200", "100/200", "150/200", "200/200", "200/200"]
    assert lines[0].startswith("synth-corpus: 50/200 utt (25%), 10.0 utt/s")
    assert "eta 0:15" in lines[0]
    assert "eta" not in lines[-1]


def test_line_progress_writes_a_line_every_interval_when_slow():
    stream, clock = io.StringIO(), FakeClock()
    bar = LineProgress(1000, "prepare train", "file", stream, every_seconds=30, every_percent=50,
                       clock=clock)
    for _ in range(10):
        clock.now += 31
        bar.update()
    assert len(stream.getvalue().splitlines()) == 10


def test_progress_is_a_line_logger_off_a_terminal_and_silent_when_disabled():
    stream = io.StringIO()
    assert isinstance(progress(10, "x", stream=stream), LineProgress)
    quiet = progress(10, "x", enabled=False, stream=stream)
    quiet.update(10)
    quiet.close()
    assert stream.getvalue() == ""
