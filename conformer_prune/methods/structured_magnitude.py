"""Structured magnitude pruning of a trained dense model, then fine-tuning: the baseline a user
would try before learning the pruning (issue: equal-size structured baselines).

From the dense run's last checkpoint, every unit of every site (sites.py) is scored by the
magnitude of the weights it owns, the weakest are removed with the same shrink as adaptive
dropout, and the compact model is fine-tuned by the recipe. Two ways to choose how many:

- `widths_from`: an `arch.json` (a shrunk adaptive dropout model): keep, per layer and site,
  exactly as many units as it kept (per head for query and value), the strongest by L2 norm.
- `params_from`: an `arch.json` whose encoder parameter count to match, with one global
  ranking over all sites. The score is the RMS of the weights a unit owns (its L2 norm over the
  square root of their number): plain norms would favour units that own many weights, and
  the RMS is the element-wise magnitude criterion carried over to units.
"""

import json
import math
from pathlib import Path

import torch
from speechbrain.utils.checkpoints import Checkpointer

from conformer_prune.errors import InputError, gist
from conformer_prune.methods.base import PruningMethod
from conformer_prune.model import count_params, param_state
from conformer_prune.shrink import build_compact, shrink_modules
from conformer_prune.sites import (
    SITES,
    encoder_layers,
    full_keep,
    params_removed_by,
    site_shape,
    unit_cost,
    unit_weights,
)


def last_checkpoint(run_dir):
    """The latest checkpoint folder of a training run (the end of its training)."""
    checkpoint = Checkpointer(Path(run_dir) / "save").find_checkpoint()
    if checkpoint is None:
        raise InputError(f"{run_dir}: no checkpoint under save/ (train the dense run "
                         "first: python train.py hparams/mini/conformer_dense.yaml)")
    return checkpoint.path


def load_dense_run(modules, dense_run):
    """Loads the dense run's last checkpoint (model and feature normaliser) into the Brain's
    modules: the start of every prune-then-fine-tune method. Returns the checkpoint folder."""
    checkpoint = last_checkpoint(dense_run)
    state = torch.load(checkpoint / "model.ckpt", map_location="cpu")
    try:
        modules["asr"].load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{checkpoint / 'model.ckpt'}: the dense run's model does not fit "
                         f"this YAML's arch (a gated or other-size run?): {gist(err)}"
                         ) from None
    normalizer = checkpoint / "normalizer.ckpt"
    if normalizer.exists():
        modules["normalize"]._load(normalizer)
    return checkpoint


def read_arch_file(path):
    """{"arch", "widths"} of a compact model folder's arch.json (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "arch.json"
    if not path.exists():
        raise InputError(f"{path}: missing; expected the arch.json of a shrunk model "
                         "(conformer-prune shrink RUN --out DIR)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(saved, dict) or "arch" not in saved or "widths" not in saved:
        raise InputError(f"{path}: expected an object with keys 'arch' and 'widths'")
    return saved


def encoder_params_of(arch_file):
    """Encoder parameters of the compact model an arch.json describes (built, then counted)."""
    saved = read_arch_file(arch_file)
    return count_params(param_state(build_compact(saved["arch"], saved["widths"])))["encoder"]


def size_target(arch_file):
    """results.json's record of the size a baseline was matched to (the dashboard checks it)."""
    return {"encoder": encoder_params_of(arch_file), "from": str(arch_file)}


def unit_norms(layer, site):
    """L2 norm of the weights each unit owns, in the keep mask's shape."""
    return unit_weights(layer, site).norm(dim=1).view(site_shape(layer, site))


def keep_widths_of(model, widths):
    """Per layer and site, the strongest units, as many as `widths` (shrink widths) keeps."""
    layers = encoder_layers(model)
    if len(widths["layers"]) != len(layers):
        raise ValueError(f"widths describe {len(widths['layers'])} encoder layers, "
                         f"the model has {len(layers)}")
    keep = {}
    for i, (layer, layer_widths) in enumerate(zip(layers, widths["layers"])):
        for name, width in layer_widths.items():
            if name == "attention":
                for site in ("query", "value"):
                    keep[(i, site)] = _top_per_row(unit_norms(layer, site), width[site])
            else:
                keep[(i, name)] = _top_per_row(unit_norms(layer, name)[None], [width])[0]
    return keep


def _top_per_row(scores, counts):
    """Boolean mask keeping the counts[r] largest scores of each row r."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for row, count in enumerate(counts):
        if count:
            keep[row, scores[row].topk(int(count)).indices] = True
    return keep


def keep_global(model, target_encoder_params):
    """One ranking of every unit by the RMS of its weights; the weakest go until the encoder
    has at most `target_encoder_params` parameters."""
    encoder = count_params(param_state(model))["encoder"]
    to_remove = encoder - target_encoder_params
    if to_remove <= 0:
        return full_keep(model)
    units = []  # (score, layer, site, flat index, cost)
    for i, layer in enumerate(encoder_layers(model)):
        for site in SITES:
            cost, weights = unit_cost(layer, site), unit_weights(layer, site)
            scores = weights.norm(dim=1) / math.sqrt(weights.shape[1])  # RMS per unit
            units += [(float(s), i, site, j, cost) for j, s in enumerate(scores)]
    units.sort(key=lambda unit: unit[0])
    keep = full_keep(model)
    removed = 0
    # Removing a head's last value dimension also removes its queries, and a module's last
    # channel more than its unit cost, while a query of a head already gone costs nothing:
    # the running sum of unit costs is checked against the exact count before stopping.
    for _, i, site, j, cost in units:
        keep[(i, site)].view(-1)[j] = False
        removed += cost
        if removed >= to_remove:
            removed = params_removed_by(model, keep)
            if removed >= to_remove:
                break
    return keep


class StructuredMagnitude(PruningMethod):
    """Prune the dense run's last checkpoint by unit magnitude, then fine-tune the compact model.

    Arguments
    ---------
    dense_run : str
        The dense training run folder (results/<name>/<seed>) whose last checkpoint is pruned;
        its feature normaliser is loaded too.
    widths_from : str, optional
        arch.json (or its folder) of a shrunk model: match its widths per layer and site.
    params_from : str, optional
        arch.json (or its folder) of a shrunk model: match its encoder parameter count with one
        global ranking. Exactly one of widths_from and params_from.
    """

    kind = "structured"
    model_kind = "compact"

    def __init__(self, dense_run, widths_from=None, params_from=None, name=None):
        if (widths_from is None) == (params_from is None):
            raise InputError("StructuredMagnitude: give exactly one of widths_from, params_from "
                             "(the method's keys in the YAML)")
        self.dense_run = str(dense_run)
        self.widths_from = widths_from
        self.params_from = params_from
        self.name = name or ("magnitude_widths" if widths_from else "magnitude_global")
        self.widths = None
        self.source = None
        self.size_target = None

    def attach(self, modules):
        checkpoint = load_dense_run(modules, self.dense_run)
        asr = modules["asr"]
        self.size_target = size_target(self.widths_from or self.params_from)
        if self.widths_from:
            keep = keep_widths_of(asr, read_arch_file(self.widths_from)["widths"])
        else:
            keep = keep_global(asr, self.size_target["encoder"])
        self.widths = shrink_modules(asr, keep)
        self.source = str(checkpoint)
        return modules

    def results_summary(self, modules):
        return {"pruned_from": self.source, "widths": self.widths,
                "size_target": self.size_target}

    def settings(self):
        return {"dense_run": self.dense_run, "widths_from": self.widths_from,
                "params_from": self.params_from}

