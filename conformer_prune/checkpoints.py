"""SpeechBrain's Checkpointer, made safe to kill and complete for exact resumption.

Two things SpeechBrain 1.1's Checkpointer does not do, and a run on a shared cluster needs:

* **A killed save is never taken for a checkpoint.** SpeechBrain writes the checkpoint's meta file
  (CKPT.yaml) first and the tensors after it, and takes any folder with a meta file for a
  checkpoint: a run killed, or a disk that fills up, in the middle of a save leaves a folder that
  the next start would load half-written. Here the meta file is written under another name and
  renamed to CKPT.yaml (an atomic rename) only after every file is on disk; a folder without it
  is not a checkpoint, and the next start removes it and says so.
* **The random state is saved**: the torch generators (SpeechBrain's SaveableGenerator), so that
  dropout and the gates' Gumbel noise after a resume are those of the run that was not killed.

And one thing SpeechBrain does not check at all: that a run folder is resumed (or skipped as done)
with the hyperparameters it was started with. `changed_hparams` compares the folder's saved
`hyperparams.yaml` with what the YAML and overrides resolve to now; train.py refuses to resume
on a difference, and `conformer-prune check-run` lets a recipe ask the same of a finished run.
"""

import argparse
import logging
import os
import re
import shutil
from pathlib import Path

import ruamel.yaml
from hyperpyyaml import resolve_references
from speechbrain import parse_arguments
from speechbrain.utils.checkpoints import METAFNAME, Checkpointer
from speechbrain.utils.distributed import ddp_barrier, if_main_process
from speechbrain.utils.repro import SaveableGenerator

from conformer_prune.errors import InputError, gist

logger = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".partial"
MISMATCH = re.compile(r"size mismatch|Missing key|Unexpected key|missing a load path|"
                      r"KeyError|has no state")


class SafeCheckpointer(Checkpointer):
    """Checkpointer whose checkpoints appear only once complete, and that saves the RNG state.

    Takes Checkpointer's arguments. `random_state: False` leaves the generators out.
    """

    def __init__(self, *args, random_state=True, **kwargs):
        super().__init__(*args, **kwargs)
        if random_state:
            # Optional: checkpoints written before it existed still load (with a warning).
            self.add_recoverable("random_state", SaveableGenerator(), optional_load=True)
        self._pending_meta = None

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):
        try:
            checkpoint = super().save_checkpoint(meta, end_of_epoch, name, verbosity)
            if if_main_process() and self._pending_meta is not None:
                _fsync_folder_files(self._pending_meta.parent)
                os.replace(self._pending_meta, self._pending_meta.parent / METAFNAME)
        except (OSError, RuntimeError) as err:
            # A full disk, a quota, a folder gone: torch.save reports a failed write as a
            # RuntimeError ("PytorchStreamWriter failed writing ..."), plain files as OSError.
            folder = self._pending_meta.parent if self._pending_meta else self.checkpoints_dir
            reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
            raise InputError(
                f"{folder}: saving the checkpoint failed ({reason}); it is incomplete and will "
                "not be loaded. The previous checkpoints are intact: free space and run the "
                "same command again to resume from the last one") from None
        finally:
            self._pending_meta = None
        # Under DDP the other ranks must not list the checkpoints (to delete old ones, each rank
        # the same) before rank 0 has made this one visible: they would list one fewer, skip
        # a deletion whose broadcast rank 0 then waits for, and the run would hang.
        ddp_barrier()
        return checkpoint

    def _save_checkpoint_metafile(self, fpath, meta_to_include={}, end_of_epoch=True):
        # Written under a name that does not make the folder a checkpoint yet (see above).
        partial = Path(str(fpath) + PARTIAL_SUFFIX)
        meta = super()._save_checkpoint_metafile(partial, meta_to_include, end_of_epoch)
        self._pending_meta = partial
        return meta

    def _call_load_hooks(self, checkpoint):
        try:
            super()._call_load_hooks(checkpoint)
        except InputError:
            raise
        except (RuntimeError, KeyError, ValueError) as err:
            # Only a checkpoint that does not fit (torch's "size mismatch for ...", "Unexpected
            # key(s) ...", a recoverable missing); out of memory or a damaged file stay as they
            # are, since the advice below (remove the checkpoints) would be wrong for them.
            if not MISMATCH.search(str(err)):
                raise
            raise InputError(
                f"{checkpoint.path}: this checkpoint does not fit the run's model or method "
                f"(written by another architecture or method?): {gist(err)}. "
                f"Use another --output_folder, or remove {self.checkpoints_dir} to start "
                "over") from None

    def recover_if_possible(self, *args, **kwargs):
        self.remove_incomplete()
        return super().recover_if_possible(*args, **kwargs)

    def remove_incomplete(self):
        """Removes checkpoint folders a killed save left without a meta file; returns them."""
        if not if_main_process() or not self.checkpoints_dir.is_dir():
            return []
        incomplete = [path for path in self.checkpoints_dir.glob("CKPT+*")
                      if path.is_dir() and not (path / METAFNAME).exists()]
        for path in incomplete:
            logger.warning("%s: incomplete checkpoint (its save was interrupted); removing it",
                           path)
            shutil.rmtree(path)
        return incomplete


def _fsync_folder_files(folder):
    """Flushes every file of the folder to disk before its meta file makes it a checkpoint."""
    for path in Path(folder).iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# Keys that do not make another run: where the data lies, how many threads read it, and the
# run's name and folder (a run folder copied under another name is still that run).
FREE_KEYS = ("data_folder", "num_threads", "experiment_name", "output_folder")
# Settings of the test stage's search only: the same training decoded another way.
DECODE_KEYS = ("test_beam_size", "ctc_weight_decode", "lm_weight", "lm_folder", "max_decode_ratio")
# train.py may also resume a run with more epochs, or a finished run to decode it with other
# search settings: continuing a finished run is what that is for.
FREE_ON_RESUME = (*FREE_KEYS, "number_of_epochs", *DECODE_KEYS)
# check-run's exit status for a run trained as asked but decoded with other search settings.
DECODED_OTHERWISE = 3
# Keys added to the YAMLs with a value that changes training, and the value that gives what the
# code did before them: a run folder whose saved file lacks one was trained with that value.
ADDED_WITH_NEW_BEHAVIOUR = {"inter_ctc_weight": 0.0}


def changed_hparams(output_folder, hparams_file, overrides, free=FREE_KEYS):
    """Top-level keys whose resolved values differ from the run folder's saved hyperparams.yaml.

    Empty when they agree or when the folder has no saved file yet (a new run). Comments do not
    count, nor do the `free` keys: they take their saved values before the YAML is resolved,
    since other keys refer to them (epoch_counter's limit is `!ref <number_of_epochs>`). Nor do
    keys the saved file lacks: a YAML that gained a key (declared with the behaviour the code
    had without it, such as `augment_from_epoch: 1`) still describes its earlier runs; except
    the keys of ADDED_WITH_NEW_BEHAVIOUR, which count as changed when their value now differs
    from the one the earlier runs had.
    """
    saved = Path(output_folder) / "hyperparams.yaml"
    if not saved.is_file():
        return []
    before = _values_by_key(saved.read_text(encoding="utf-8"))
    reader = ruamel.yaml.YAML()  # as hyperpyyaml reads overrides, tags and all
    pinned = (reader.load(overrides) if isinstance(overrides, str) else overrides) or {}
    for key in free:
        if key in before:
            pinned[key] = reader.load("\n".join(before[key]))[key]
    with open(hparams_file, encoding="utf-8") as fin:
        after = _values_by_key(resolve_references(fin, pinned).getvalue())
    changed = {key for key in before if before[key] != after.get(key) and key not in free}
    for key, old_value in ADDED_WITH_NEW_BEHAVIOUR.items():
        if key not in before and key in after:
            if reader.load("\n".join(after[key]))[key] != old_value:
                changed.add(key)
    return sorted(changed)


def _values_by_key(yaml_text):
    """{top-level key: its lines}, with comments (whole-line and inline) and blank lines left
    out."""
    # Text, not a parse: loading the YAML would build the model and every object it declares.
    values, key = {}, None
    for line in yaml_text.splitlines():
        line = _without_comment(line)
        if not line.strip():
            continue
        if not line[0].isspace() and ":" in line:
            key = line.split(":", 1)[0].strip()
        values.setdefault(key, []).append(line)
    return values


def _without_comment(line):
    """The line up to its comment: YAML's `#` at the start or after white space, outside a
    quoted scalar (a quote opens one only where a scalar can start, so `it's` opens none)."""
    quote, escaped = None, False
    for index, char in enumerate(line):
        before = line[index - 1] if index else " "
        if escaped:  # the second quote of '' inside a single-quoted scalar
            escaped = False
        elif quote:
            if char == quote == "'" and line[index + 1:index + 2] == "'":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "'\"" and before in " :[{,-":
            quote = char
        elif char == "#" and before.isspace():
            return line[:index].rstrip()
    return line.rstrip()


def check_same_hparams(output_folder, hparams_file, overrides, free=FREE_KEYS):
    """Raises InputError when the run folder was started with other hyperparameters."""
    changed = changed_hparams(output_folder, hparams_file, overrides, free)
    if changed:
        raise InputError(
            f"{output_folder}: this run was started with other hyperparameters than "
            f"{hparams_file} and the overrides give now (changed: {', '.join(changed)}; compare "
            f"with {Path(output_folder) / 'hyperparams.yaml'}). Give the new settings their own "
            "--experiment_name or --output_folder, or remove the folder to start over")


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "check-run",
        help="check that a run folder was made by this YAML and these overrides",
        description="Exits 0 when RUN's saved hyperparams.yaml is what YAML with the overrides "
                    "(train.py's own --key value arguments) resolves to; otherwise names the "
                    "keys that changed and exits 1; exits 3 when only the search settings "
                    f"differ ({', '.join(DECODE_KEYS)}): the run is trained as asked and "
                    "train.py resumed on it decodes it again. Recipes ask this before they "
                    "skip a finished run.",
    )
    parser.add_argument("run", help="the run folder, results/<name>/<seed>")
    parser.add_argument("yaml", help="the training YAML")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--key value",
                        help="train.py's overrides, as given to it")
    parser.set_defaults(func=run_check)
    return parser


def run_check(args):
    _, _, overrides = parse_arguments([args.yaml, *args.overrides])  # train.py's own parser
    check_same_hparams(args.run, args.yaml, overrides, (*FREE_KEYS, *DECODE_KEYS))
    # Trained as asked; the search settings, and the keys that refer to them, may still differ.
    decoding = changed_hparams(args.run, args.yaml, overrides)
    if decoding:
        print(f"{args.run}: trained with these settings but decoded with other search settings "
              f"(changed: {', '.join(decoding)}); train.py decodes it again when it resumes it")
        return DECODED_OTHERWISE
    print(f"{args.run}: same hyperparameters as {args.yaml} with the overrides")
    return 0
