"""Small models trained from scratch: the other baseline a pruning method must beat.

If a pruned model is only as good as the same architecture trained from random initialisation
for the same number of updates, the pruning found an architecture, not weights. Two variants:

- `widths_from`: the exact compact architecture a shrunk model has (its arch.json widths).
- `uniform_params_from`: every prunable site of every layer kept at one common fraction
  (FFN hidden units, query and value dimensions of each head, convolution channels), the
  fraction chosen so that the encoder has as many parameters as the given arch.json's model:
  the uniformly narrower Conformer a user would build first, at the same d_model (so the
  decoder and the CTC head stay the same size and only the encoder is compared).
"""

import torch

from conformer_prune.errors import InputError
from conformer_prune.methods.base import PruningMethod
from conformer_prune.methods.structured_magnitude import (
    read_arch_file,
    size_target,
)
from conformer_prune.model import count_params, param_state
from conformer_prune.shrink import apply_widths
from conformer_prune.sites import SITES, encoder_layers, params_removed_by, site_shape, widths_of


def uniform_keep(model, fraction):
    """Keep masks that keep the first round(fraction * units) units of every site (per head
    for query and value); at least one unit each."""
    keep = {}
    for i, layer in enumerate(encoder_layers(model)):
        for site in SITES:
            shape = site_shape(layer, site)
            width = max(1, round(fraction * shape[-1]))
            mask = torch.zeros(shape, dtype=torch.bool)
            mask[..., :width] = True
            keep[(i, site)] = mask
    return keep


def uniform_fraction_for(model, target_encoder_params, steps=40):
    """The largest fraction whose uniform keep leaves at most the target encoder count."""
    encoder = count_params(param_state(model))["encoder"]
    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        left = encoder - params_removed_by(model, uniform_keep(model, middle))
        low, high = (middle, high) if left <= target_encoder_params else (low, middle)
    return low


class CompactFromScratch(PruningMethod):
    """Train a compact Conformer from random initialisation.

    Arguments
    ---------
    widths_from : str, optional
        arch.json (or its folder) of a shrunk model: train exactly its architecture.
    uniform_params_from : str, optional
        arch.json (or its folder) of a shrunk model: train a uniformly narrower model with its
        encoder parameter count. Exactly one of the two.
    """

    kind = "structured"
    model_kind = "compact"

    def __init__(self, widths_from=None, uniform_params_from=None, name=None):
        if (widths_from is None) == (uniform_params_from is None):
            raise InputError("CompactFromScratch: give exactly one of widths_from, "
                             "uniform_params_from (the method's keys in the YAML)")
        self.widths_from = widths_from
        self.uniform_params_from = uniform_params_from
        self.name = name or ("scratch_widths" if widths_from else "scratch_uniform")
        self.widths = None
        self.fraction = None
        self.size_target = None

    def attach(self, modules):
        asr = modules["asr"]
        self.size_target = size_target(self.widths_from or self.uniform_params_from)
        if self.widths_from:
            self.widths = read_arch_file(self.widths_from)["widths"]
        else:
            self.fraction = uniform_fraction_for(asr, self.size_target["encoder"])
            self.widths = widths_of(uniform_keep(asr, self.fraction), asr)
        apply_widths(asr, self.widths)
        return modules

    def results_summary(self, modules):
        summary = {"widths": self.widths, "size_target": self.size_target}
        if self.fraction is not None:
            summary["uniform_fraction"] = self.fraction
        return summary

    def settings(self):
        return {"widths_from": self.widths_from, "uniform_params_from": self.uniform_params_from}
