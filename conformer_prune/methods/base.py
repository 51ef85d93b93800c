"""The interface every pruning method implements, and the dense method (no pruning).

The training Brain calls these hooks and nothing else of a method:

    attach(modules)                 before the Brain and the checkpointer see the model: insert
                                    gates, load and prune a source model, build compact widths.
                                    Must be deterministic, so that a resumed run rebuilds the
                                    same structure before its checkpoint loads.
    optimizers(modules)             {name: optimizer} for parameters the method owns; they are
                                    left out of the model's optimizer and checkpointed by name.
    penalty(modules, progress)      a loss term (tensor) or None; progress in [0, 1] is the
                                    fraction of all optimiser steps done.
    after_step(modules, progress)   after every optimiser step (masks, scores, schedules).
    after_optimizer_step(modules, progress)
                                    right after the model optimiser's step, gradients still
                                    in .grad (gradient-based importance scores, masking).
    after_validation(modules, progress, rates)
                                    after every epoch's dev pass, before its checkpoint:
                                    rates = {"wer", "cer"} of greedy CTC on the dev set (every
                                    rank validates the whole set, so all decide alike).
    keep_masks(modules)             what the method hands over to the shrink:
                                    {(layer, site): bool mask} (sites.py), or None.
    epoch_summary(modules, progress) extra fields of the epoch's history.jsonl line.
    results_summary(modules)        extra fields of results.json.
    state_dict() / load_state_dict()  the method's own state, saved in every checkpoint.

`modules` is the Brain's module dict (`modules.asr` is the ModuleDict of build_asr_modules,
`modules.normalize` the feature normaliser). Methods are model transforms: they import gates,
sites and shrink, never the training code.
"""

from pathlib import Path

import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from conformer_prune.errors import InputError


@register_checkpoint_hooks
class PruningMethod:
    """Base class: every hook does nothing. Subclasses override what they need.

    Attributes read by the recipe: `name` (the label in results.json and on the dashboard),
    `kind` ("dense", "structured", "unstructured" or "delta") and `model_kind` (what the
    training checkpoint holds: "dense", "gated" or "compact").
    """

    name = "dense"
    kind = "dense"
    model_kind = "dense"

    def attach(self, modules):
        return modules

    def optimizers(self, modules):
        return {}

    def penalty(self, modules, progress):
        return None

    def after_step(self, modules, progress):
        return None

    def after_optimizer_step(self, modules, progress):
        """Right after the model optimiser's step, while `.grad` still holds the step's
        (clipped) gradients: where importance scores that read gradients are updated."""
        return None

    def after_validation(self, modules, progress, rates):
        return None

    def keep_masks(self, modules):
        return None

    def epoch_summary(self, modules, progress):
        return {}

    def results_summary(self, modules):
        return {}

    def settings(self):
        """The method's settings for results.json (plain values)."""
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f"method {self.name}: has no state, got keys {sorted(state)}")

    @mark_as_saver
    def _save(self, path):
        # The method's name goes with its state, so that a run started again with another
        # method in the same folder is told so instead of loading foreign state.
        torch.save({"method": self.name, "kind": self.kind, "state": self.state_dict()}, path)

    @mark_as_loader
    def _load(self, path, end_of_epoch=False):
        saved = torch.load(path, map_location="cpu")
        if set(saved) == {"method", "kind", "state"}:
            if (saved["method"], saved["kind"]) != (self.name, self.kind):
                raise InputError(
                    f"{path}: checkpoint of method {saved['method']} ({saved['kind']}), but "
                    f"this run's YAML declares {self.name} ({self.kind}); use another "
                    f"--output_folder, or remove {Path(path).parent.parent} to start over")
            saved = saved["state"]
        try:
            self.load_state_dict(saved)
        except (KeyError, ValueError) as err:
            raise InputError(f"{path}: not the state of method {self.name} ({err})") from None

    def describe(self):
        """{"name", "kind", "settings"}: how results.json records the method."""
        return {"name": self.name, "kind": self.kind, "settings": self.settings()}


class Dense(PruningMethod):
    """Plain training: no pruning."""

    def __init__(self, name="dense"):
        self.name = name
