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
"""

import logging
import os
import re
import shutil
from pathlib import Path

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
