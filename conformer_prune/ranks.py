"""Checks that the processes of a torchrun (DDP) run end with the same training state.

DDP keeps replicas equal by averaging gradients; anything it does not see (a parameter updated
outside the wrapped forward, method state computed from one rank's data, a normaliser's
statistics) would drift apart silently, and only rank 0's copy is saved. At the end of
training every rank hashes its state and rank 0 compares: results.json records the outcome,
and a mismatch is an error that names the parts that differ.
"""

import argparse
import hashlib
import io
from pathlib import Path

import torch
import torch.distributed as dist


def state_fingerprints(modules, method):
    """{part: sha256 hex} of every module's state_dict and of the method's state."""
    parts = {name: module.state_dict() for name, module in modules.items()}
    parts["method"] = method.state_dict()
    return {name: _digest(state) for name, state in parts.items()}


def _digest(state):
    buffer = io.BytesIO()
    if isinstance(state, dict):
        state = {key: state[key] for key in sorted(state)}
    torch.save(state, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def compare_ranks(modules, method):
    """Every rank's fingerprints, compared on all ranks (a collective: every rank calls it).

    Returns None outside torchrun, else {"world_size", "agree", "fingerprint" (rank 0's
    hash of all parts)}; raises RuntimeError naming the parts that differ.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    mine = state_fingerprints(modules, method)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = sorted({part for rank in everyone for part, digest in rank.items()
                     if digest != everyone[0].get(part)})
    if differ:
        raise RuntimeError(
            f"DDP ranks ended training with different state in: {', '.join(differ)} "
            f"(only rank 0's copy is saved); this is a bug, please report it with the YAML")
    overall = hashlib.sha256("".join(mine[key] for key in sorted(mine)).encode()).hexdigest()
    return {"world_size": len(everyone), "agree": True, "fingerprint": overall}


def per_rank_batch_length(train_csv, max_batch_length, world_size, max_duration=None,
                          **sampler_opts):
    """The largest per-rank `max_batch_length` whose batches, shared among `world_size` ranks,
    give each rank at least as many steps per epoch as one process gets with
    `max_batch_length` (searched in 0.5 s steps): about the same optimiser steps and global
    batch as the single-process run.

    Why searched and not divided: SpeechBrain's DynamicBatchSampler packs buckets, so half
    the length does not give twice the batches (on the embedded corpus 80 s gives 166 and
    40 s only 195).
    """
    from speechbrain.dataio.sampler import DynamicBatchSampler

    from conformer_prune.asr_brain import csv_dataset

    data = csv_dataset(train_csv, max_duration)

    def batches(length):
        return len(DynamicBatchSampler(data, max_batch_length=length,
                                       length_func=lambda e: float(e["duration"]),
                                       **sampler_opts))

    target = batches(max_batch_length)
    length = max_batch_length / world_size
    while length > 1 and -(-batches(length) // world_size) < target:
        length -= 0.5
    return length


def main(argv=None):
    """`python -m conformer_prune.ranks RUN_DIR NPROC`: prints the per-rank max_batch_length
    that gives a torchrun run of RUN_DIR's recipe the steps of RUN_DIR (recipes/ddp_check.sh)."""
    from conformer_prune.shrink import plain_hparams  # here: training need not load it

    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[1].strip())
    parser.add_argument("run_dir", help="a finished single-process run (its prepared CSVs)")
    parser.add_argument("nproc", type=int)
    args = parser.parse_args(argv)
    hparams = plain_hparams(Path(args.run_dir) / "hyperparams.yaml")
    batching = dict(hparams["dynamic_batching"])
    train_csv = Path(args.run_dir) / "data" / Path(hparams["train_csv"]).name
    print(per_rank_batch_length(train_csv, batching.pop("max_batch_length"), args.nproc,
                                hparams.get("max_train_duration"), **batching))


if __name__ == "__main__":
    main()
