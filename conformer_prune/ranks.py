"""Checks that the processes of a torchrun (DDP) run end with the same training state.

DDP keeps replicas equal by averaging gradients; anything it does not see (a parameter updated
outside the wrapped forward, method state computed from one rank's data, a normaliser's
statistics) would drift apart silently, and only rank 0's copy is saved. At the end of
training every rank hashes its state and rank 0 compares: results.json records the outcome,
and a mismatch is an error that names the parts that differ.
"""

import hashlib

import torch
import torch.distributed as dist


def state_fingerprints(modules, method):
    """{part: sha256 hex} of every module's state_dict and of the method's state."""
    parts = {name: module.state_dict() for name, module in modules.items()}
    parts["method"] = method.state_dict()
    return {name: _digest(state) for name, state in parts.items()}


def _digest(state):
    """sha256 of a (nested) state: keys, dtypes, shapes and values, not devices (under nccl
    rank r's tensors live on cuda:r, and torch.save's bytes would say so)."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest, value):
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(repr(value).encode())


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

