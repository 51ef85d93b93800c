"""Runs that outgrow one process or get killed: torchrun DDP through the real train.py, and a
SIGKILL in the middle of an epoch followed by the same command, which must end exactly where the
run that was not killed ends (issue 16)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conformer_prune.checkpoints import SafeCheckpointer
from conformer_prune.errors import InputError
from conformer_prune.ranks import compare_ranks
from conformer_prune.methods import Dense
from tiny_runs import ROOT, SMALL_BATCHES, free_port, tiny_arguments, train_tiny

GATED = "hparams/mini/conformer_adrop.yaml"
# Gates that start at their threshold, so that a short run already moves the gate decisions.
# No budget: the recipe's is for the mini model, larger than the whole tiny one.
GATE_ARGS = ("--gate_threshold=0.9", "--gate_init_retention=0.9",
             "--gate_target_params=null")


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


# ----- DDP ---------------------------------------------------------------------------------


def test_torchrun_two_processes_train_the_real_recipe_and_end_identical(corpus, tmp_path):
    """The README's torchrun command (gloo on CPU, chosen by train.py): both ranks train, the
    schedule clock counts one rank's steps, the ranks end with the same state, rank 0 writes."""
    run_dir = tmp_path / "ddp"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port", str(free_port()))
    # keep_checkpoints 1: the second epoch's save deletes the first, a collective step that
    # hung when the ranks saw different checkpoint lists.
    train_tiny(GATED, corpus, run_dir, 2, *GATE_ARGS, f"--dynamic_batching={SMALL_BATCHES}",
               "--keep_checkpoints=1", launcher=torchrun)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["ranks"]["world_size"] == 2 and results["ranks"]["agree"]
    history = _history(run_dir)
    assert [entry["epoch"] for entry in history] == [1, 2]  # one writer, not two
    # Each rank takes its share of every batch: as many steps as one process, and the clock
    # reaches the end of training.
    assert history[-1]["progress"] == 1.0
    assert history[-1]["regulariser_target"] == -4.0  # gate_target_end of the YAML
    steps = [int(n) for n in re.findall(r"steps: (\d+)", (run_dir / "train_log.txt").read_text())]
    assert steps == [_single_process_batches(run_dir), 2 * _single_process_batches(run_dir)]


def _single_process_batches(run_dir):
    from speechbrain.dataio.sampler import DynamicBatchSampler

    from conformer_prune.asr_brain import csv_dataset

    data = csv_dataset(run_dir / "data" / "train-clean-100.csv", 12.0)
    return len(DynamicBatchSampler(data, max_batch_length=8, num_buckets=4, shuffle=True,
                                   batch_ordering="random",
                                   length_func=lambda example: float(example["duration"])))


def test_every_rank_takes_a_share_of_every_batch():
    from conformer_prune.asr_brain import SplitBatchesAcrossRanks

    batches = [[0, 1, 2, 3, 4], [5, 6], [7]]
    shares = [list(SplitBatchesAcrossRanks(batches, rank, 2)) for rank in (0, 1)]
    assert shares[0] == [[0, 2, 4], [5], [7]]
    assert shares[1] == [[1, 3], [6], [7]]  # one item left: both ranks take it
    assert len(SplitBatchesAcrossRanks(batches, 1, 2)) == 3


def test_ranks_that_drift_apart_are_an_error_naming_the_part(tmp_path):
    port = free_port()
    mp.spawn(_compare_different_ranks, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(
            "DDP ranks ended training with different state in: asr")


def _compare_different_ranks(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # a different layer on each rank
        modules = torch.nn.ModuleDict({"asr": torch.nn.Linear(3, 2)})
        try:
            compare_ranks(modules, Dense())
            message = "no error"
        except RuntimeError as error:
            message = str(error)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as out:
            out.write(message)
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_rank_sees_a_checkpoint_before_old_ones_are_deleted(tmp_path):
    """Rank 0 makes a checkpoint visible last (its meta file is renamed in after the tensors);
    rank 1 must not list the checkpoints before that, or the ranks disagree on what to delete
    and wait for each other for ever. Rank 0 is slowed down at that point to make it likely."""
    mp.spawn(_save_twice_keeping_one, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert len(list((tmp_path / "save").glob("CKPT+*"))) == 1
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "saved"


def _save_twice_keeping_one(rank, port, out_dir):
    import datetime

    import conformer_prune.checkpoints as checkpoints

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        if rank == 0:
            flush = checkpoints._fsync_folder_files
            checkpoints._fsync_folder_files = lambda folder: (time.sleep(2), flush(folder))
        checkpointer = SafeCheckpointer(os.path.join(out_dir, "save"),
                                        recoverables={"layer": torch.nn.Linear(2, 2)})
        for step in range(2):
            checkpointer.save_and_keep_only(meta={"step": step}, num_to_keep=1)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as out:
            out.write("saved")
    finally:
        dist.destroy_process_group()


# ----- kill and resume -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["adrop", "seven"])
def test_a_run_killed_mid_epoch_resumes_to_the_same_parameters_and_history(
        method, corpus, tmp_path, request):
    """SIGKILL just after the first checkpoint inside epoch 1, then the same command again:
    every file of both epochs' checkpoints (model, optimisers, scheduler, method state: gates
    and alpha, or SEVEN's scores, moments and masks; normaliser, counters, RNG, data position)
    and history.jsonl equal those of an uninterrupted run, bit for bit (one thread, CPU)."""
    if method == "adrop":
        yaml, method_args = GATED, GATE_ARGS
    else:
        yaml = "hparams/mini/conformer_seven.yaml"
        method_args = (f"--dense_run={request.getfixturevalue('dense_run')}",)
    overrides = (*method_args, f"--dynamic_batching={SMALL_BATCHES}", "--ckpt_interval_steps=3")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_tiny(yaml, corpus, straight, 2, *overrides)

    _kill_at_first_intra_epoch_checkpoint(tiny_arguments(yaml, corpus, killed, 2, *overrides),
                                          killed)
    assert not (killed / "history.jsonl").exists()  # killed inside epoch 1
    resumed = train_tiny(yaml, corpus, killed, 2, *overrides)
    assert "Loading a checkpoint from" in resumed.stdout + resumed.stderr

    for epoch in (1, 2):
        expected = _epoch_checkpoint(straight, epoch)
        got = _epoch_checkpoint(killed, epoch)
        names = sorted(path.name for path in expected.iterdir() if path.name != "CKPT.yaml")
        assert names == sorted(path.name for path in got.iterdir() if path.name != "CKPT.yaml")
        assert "random_state.ckpt" in names and "method.ckpt" in names
        for name in names:
            assert _same(_read(expected / name), _read(got / name)), f"epoch {epoch}: {name}"
    timeless = [{k: v for k, v in entry.items() if k != "epoch_seconds"}
                for entry in _history(straight)]
    assert [{k: v for k, v in entry.items() if k != "epoch_seconds"}
            for entry in _history(killed)] == timeless


def _kill_at_first_intra_epoch_checkpoint(arguments, run_dir):
    process = subprocess.Popen([sys.executable, *arguments], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while process.poll() is None and time.monotonic() < deadline:
            metas = (run_dir / "save").glob("CKPT+*/CKPT.yaml")
            if any("intra_epoch" in meta.read_text() for meta in metas):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def _epoch_checkpoint(run_dir, epoch):
    for folder in (run_dir / "save").glob("CKPT+*"):
        meta = (folder / "CKPT.yaml").read_text()
        if "end-of-epoch: true" in meta and f"\nepoch: {epoch}\n" in meta:
            return folder
    raise AssertionError(f"{run_dir}: no end-of-epoch checkpoint for epoch {epoch}")


def _read(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # text files: brain.ckpt (JSON), counter, data position
        return path.read_text()


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


# ----- checkpoints that were not finished ------------------------------------------------------


class _DiskFull(torch.nn.Module):
    """A recoverable whose save fails as a full disk does, after other files were written."""

    def __init__(self):
        super().__init__()
        self.fail = False
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def state_dict(self, *args, **kwargs):
        if self.fail:
            raise OSError(28, "No space left on device")
        return super().state_dict(*args, **kwargs)


def test_a_save_that_fails_half_way_is_never_loaded_and_is_removed(tmp_path):
    layer, disk = torch.nn.Linear(2, 2), _DiskFull()
    checkpointer = SafeCheckpointer(tmp_path, recoverables={"a_layer": layer, "z_disk": disk})
    good = checkpointer.save_checkpoint(meta={"n": 1})
    with torch.no_grad():
        layer.weight.add_(1.0)
    disk.fail = True
    with pytest.raises(InputError, match=r"CKPT\+.*: saving the checkpoint failed \(No space "
                                         r"left on device\); it is incomplete"):
        checkpointer.save_checkpoint(meta={"n": 2})
    half = [path for path in tmp_path.glob("CKPT+*") if path != good.path]
    assert len(half) == 1 and (half[0] / "a_layer.ckpt").exists()  # written before the failure
    assert checkpointer.find_checkpoint().path == good.path
    disk.fail = False
    assert checkpointer.recover_if_possible().path == good.path
    assert not half[0].exists()  # removed, with a warning naming it
    assert torch.equal(layer.weight, torch.load(good.path / "a_layer.ckpt")["weight"])


# ----- bad input at every stage (docs/RELIABILITY.md) ----------------------------------------

DENSE = "hparams/mini/conformer_dense.yaml"


@pytest.fixture(scope="module")
def dense_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "dense"
    train_tiny(DENSE, corpus, run_dir, 1)
    return run_dir


def _train_fails(yaml, corpus, run_dir, *overrides, **arch):
    command = [sys.executable, *tiny_arguments(yaml, corpus, run_dir, 2, *overrides, **arch)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def test_resuming_with_other_settings_is_one_clear_error_naming_the_keys(dense_run, corpus):
    before = sorted(path.name for path in (dense_run / "save").iterdir())
    saved = (dense_run / "hyperparams.yaml").read_text()
    wider = _train_fails(DENSE, corpus, dense_run, arch=_tiny_arch(d_ffn=96))
    assert wider.startswith(f"error: {dense_run}: this run was started with other hyperparam")
    assert "(changed: arch;" in wider  # more epochs (2 here, 1 before) may be asked for
    gated = _train_fails(GATED, corpus, dense_run)
    assert "(changed: " in gated and "method" in gated
    # Nothing lost: the checkpoints and the run's saved settings are all still there.
    assert sorted(path.name for path in (dense_run / "save").iterdir()) == before
    assert (dense_run / "hyperparams.yaml").read_text() == saved


def test_a_checkpoint_of_another_architecture_or_method_is_one_clear_error(dense_run, corpus):
    # --test_only may change settings, so the checkpoint itself is what has to refuse.
    before = sorted(path.name for path in (dense_run / "save").iterdir())
    saved = (dense_run / "hyperparams.yaml").read_text()
    wider = _train_fails(DENSE, corpus, dense_run, "--test_only", arch=_tiny_arch(d_ffn=96))
    assert wider.startswith(f"error: {dense_run / 'save'}/CKPT+")
    assert "does not fit the run's model or method" in wider and "size mismatch" in wider
    gated = _train_fails(GATED, corpus, dense_run, "--test_only")
    assert "does not fit the run's model or method" in gated and "gate.logits" in gated
    assert sorted(path.name for path in (dense_run / "save").iterdir()) == before
    # and the record of how the run was trained is not rewritten by a test
    assert (dense_run / "hyperparams.yaml").read_text() == saved


def test_check_run_tells_a_finished_run_made_by_other_settings(dense_run, corpus):
    # What the recipes ask before they skip a finished run (recipes/lib.sh, is_done).
    def check(*overrides):
        replaced = {override.split("=")[0] for override in overrides}
        arguments = [argument for argument in tiny_arguments(DENSE, corpus, dense_run, 1)[2:]
                     if argument.split("=")[0] not in replaced]
        return subprocess.run(
            [sys.executable, "-m", "conformer_prune.cli", "check-run", str(dense_run), DENSE,
             *arguments, *overrides],
            cwd=ROOT, capture_output=True, text=True, timeout=300)

    same = check()
    assert same.returncode == 0, same.stderr[-2000:]
    moved = check(f"--data_folder={corpus}/.")  # where the data lies is not a setting
    assert moved.returncode == 0, moved.stderr[-2000:]
    other = check("--lr=0.01", "--number_of_epochs=3")
    assert other.returncode == 1
    changed = other.stderr.strip().splitlines()[-1].split("(changed: ")[1].split(";")[0]
    # the keys given, and those that refer to them (the optimiser's lr, the counter's limit)
    assert {"lr", "number_of_epochs", "epoch_counter"} <= set(changed.split(", "))
    assert "data_folder" not in changed and "seed" not in changed
    searched = check("--ctc_weight_decode=0.6")  # the same training, decoded another way
    assert searched.returncode == 3, searched.stderr[-2000:]
    assert "decoded with other search settings (changed: ctc_weight_decode, scorer)" \
        in searched.stdout
    both = check("--ctc_weight_decode=0.6", "--lr=0.01")
    assert both.returncode == 1
    changed = both.stderr.strip().splitlines()[-1].split("(changed: ")[1].split(";")[0]
    assert "lr" in changed.split(", ") and "ctc_weight_decode" not in changed  # training only


def test_a_finished_run_resumed_with_other_search_settings_is_only_decoded_again(
        dense_run, corpus, tmp_path):
    # What a recipe does after check-run's exit 3: train.py resumes the run, which has no
    # epoch left, so only the test stage runs, with the new settings, and records them.
    run = tmp_path / "dense"
    shutil.copytree(dense_run, run)  # a copied run folder is still that run
    saved = {path: path.read_bytes() for path in (run / "save").rglob("*") if path.is_file()}
    history = (run / "train_log.txt").read_text()
    train_tiny(DENSE, corpus, run, 1, "--ctc_weight_decode=0.6")
    assert json.loads((run / "results.json").read_text())["decode"]["ctc_weight"] == 0.6
    assert {path: path.read_bytes() for path in (run / "save").rglob("*")
            if path.is_file()} == saved  # nothing trained, no checkpoint written
    log = (run / "train_log.txt").read_text()  # the history, then the test stage's lines only
    assert log.startswith(history)
    assert all(line.startswith("test split:") for line in log[len(history):].splitlines())
    assert "ctc_weight_decode: 0.6" in (run / "hyperparams.yaml").read_text()


def _tiny_arch(**changes):
    from tiny_runs import TINY_ARCH
    arch = TINY_ARCH
    for key, value in changes.items():
        head, _, tail = arch.partition(f"{key}: ")
        arch = head + f"{key}: {value}" + tail[tail.index(","):]
    return arch


def test_a_method_checkpoint_of_another_method_is_named(tmp_path):
    from conformer_prune.gates import RetentionRegulariser, TargetSchedule
    from conformer_prune.methods.adaptive_dropout import AdaptiveDropoutMethod

    Dense()._save(tmp_path / "method.ckpt")
    adrop = AdaptiveDropoutMethod(RetentionRegulariser(1.0, TargetSchedule()),
                                  torch.optim.Adam)
    with pytest.raises(InputError, match=r"method.ckpt: checkpoint of method dense \(dense\), "
                                         r"but this run's YAML declares adrop"):
        adrop._load(tmp_path / "method.ckpt")


def test_shrink_names_a_missing_or_foreign_checkpoint(dense_run, tmp_path):
    import shutil

    from conformer_prune.cli import main as cli_main

    missing = tmp_path / "missing"
    shutil.copytree(dense_run, missing)
    for weights in (missing / "save").glob("CKPT+*/model.ckpt"):
        weights.unlink()
    assert cli_main(["shrink", str(missing), "--out", str(tmp_path / "a")]) == 1
    foreign = tmp_path / "foreign"
    shutil.copytree(dense_run, foreign)
    yaml = foreign / "hyperparams.yaml"
    yaml.write_text(yaml.read_text().replace("d_ffn: 64", "d_ffn: 96"))
    assert cli_main(["shrink", str(foreign), "--out", str(tmp_path / "b")]) == 1
    assert cli_main(["shrink", str(tmp_path), "--out", str(tmp_path / "c")]) == 1


def test_shrink_errors_are_one_line_naming_the_file(dense_run, tmp_path, capsys):
    import shutil

    from conformer_prune.cli import main as cli_main

    foreign = tmp_path / "foreign"
    shutil.copytree(dense_run, foreign)
    yaml = foreign / "hyperparams.yaml"
    yaml.write_text(yaml.read_text().replace("d_ffn: 64", "d_ffn: 96"))
    assert cli_main(["shrink", str(foreign), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {foreign}/save/CKPT+")
    assert "model.ckpt: does not fit the model" in error[0]


def test_audio_damaged_after_preparation_names_the_file(tmp_path):
    import speechbrain as sb

    from conformer_prune.asr_brain import add_pipelines

    class Pieces:  # the two tokenizer calls the text pipeline makes
        def encode_as_ids(self, words):
            return [3] * len(words)

    wav = tmp_path / "1-2-0000.flac"
    wav.write_bytes(b"damaged since preparation")
    dataset = sb.dataio.dataset.DynamicItemDataset(
        {"1-2-0000": {"wav": str(wav), "wrd": "HELLO", "duration": 1.0}})
    add_pipelines([dataset], Pieces(), 1, 2)
    with pytest.raises(InputError, match=r"1-2-0000.flac: cannot read audio .*prepare"):
        dataset[0]


def test_an_input_error_from_a_dataloader_worker_prints_as_one_line():
    from conformer_prune.errors import one_line

    worker = InputError("Caught InputError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File ...\nconformer_prune.errors."
                        "InputError: /data/1-2-0000.flac: cannot read audio (bad)")
    assert one_line(worker) == "/data/1-2-0000.flac: cannot read audio (bad)"
    assert one_line(InputError("plain")) == "plain"


def test_changed_hparams_pins_the_free_keys_and_ignores_keys_the_run_did_not_have(tmp_path):
    from hyperpyyaml import resolve_references

    from conformer_prune.checkpoints import FREE_ON_RESUME, changed_hparams

    yaml = tmp_path / "run.yaml"
    yaml.write_text("number_of_epochs: 2\ndata_folder: a\nlimit: !ref <number_of_epochs>\n"
                    "lr: 0.1  # a comment\n")
    run = tmp_path / "run"
    run.mkdir()
    with open(yaml, encoding="utf-8") as fin:
        resolved = resolve_references(fin, {}).getvalue()
    (run / "hyperparams.yaml").write_text("# Generated ...\n" + resolved)
    assert changed_hparams(run, yaml, "data_folder: b") == []
    assert changed_hparams(run, yaml, "number_of_epochs: 4") == ["limit", "number_of_epochs"]
    assert changed_hparams(run, yaml, "number_of_epochs: 4", FREE_ON_RESUME) == []
    yaml.write_text(yaml.read_text() + "added_later: 1\n")
    assert changed_hparams(run, yaml, "") == []
    # ... unless the added key changes what training does (intermediate CTC on, session 14)
    yaml.write_text(yaml.read_text() + "inter_ctc_weight: 0.0\n")
    assert changed_hparams(run, yaml, "") == []
    assert changed_hparams(run, yaml, "inter_ctc_weight: 0.3") == ["inter_ctc_weight"]
    assert changed_hparams(run, yaml, "lr: 0.2") == ["lr"]
    assert changed_hparams(tmp_path / "new_run", yaml, "lr: 0.2") == []
    # A comment edited, or added to a line, changes no value
    yaml.write_text(yaml.read_text().replace("# a comment", "# another").replace(
        "data_folder: a", "data_folder: a  # new"))
    assert changed_hparams(run, yaml, "") == []


def test_comments_are_cut_where_yaml_cuts_them():
    from conformer_prune.checkpoints import _without_comment

    assert _without_comment("lr: 0.1  # peak") == "lr: 0.1"
    assert _without_comment("    cooldown: 0 # set later") == "    cooldown: 0"
    assert _without_comment('name: "a # b"  # c') == 'name: "a # b"'
    assert _without_comment("key: 'it''s # x' # c") == "key: 'it''s # x'"
    assert _without_comment("note: it's a#b # c") == "note: it's a#b"
    assert _without_comment("# whole line") == ""


def test_train_refuses_an_intermediate_ctc_layer_the_encoder_lacks_before_any_work(tmp_path):
    """Layer 9 of a 6-layer encoder: train.py names the YAML and the layer at start-up, before
    preparing data (the data folder does not even exist) or saving the run's settings."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "train.py", "hparams/mini/conformer_dense.yaml",
         "--data_folder", str(tmp_path / "no_corpus"), "--output_folder", str(run_dir),
         "--inter_ctc_layers=[9]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "conformer_dense.yaml: inter_ctc_layers: 9 is not an encoder layer (1 to 6)" in (
        done.stderr), done.stderr[-2000:]
    assert not (run_dir / "hyperparams.yaml").exists()
