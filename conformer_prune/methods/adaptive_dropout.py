"""Adaptive dropout (Kubo et al. 2024) as a pruning method: gates, regulariser, gate optimizer.

The gates and the regulariser themselves are in gates.py and gated_conformer.py; this module is
what the training sees of them (METHODS.md section 1, docs/PRUNING.md).
"""

from conformer_prune.gated_conformer import (
    SITES,
    gate_keep,
    gate_summary,
    insert_gates,
    params_if_shrunk,
)
from conformer_prune.gates import retention_distribution
from conformer_prune.methods.base import PruningMethod
from conformer_prune.model import GATE_KEY_MARK


class AdaptiveDropoutMethod(PruningMethod):
    """Gates at `sites` of every encoder layer, pulled down by `regulariser`.

    Arguments
    ---------
    regulariser : gates.RetentionRegulariser
        The loss term on the gate logits (its schedule is the clock of the pruning).
    gate_optimizer : callable
        params -> optimizer for the gate logits. Why their own: the model's AdamW weight decay
        would pull every logit toward 0 (retention 0.5), and the Noam schedule would tie the
        gates' step size to the model's warm-up; the gates need a constant rate to follow the
        regulariser's target over the whole run.
    sites, threshold, init_retention, temperature, hard :
        As gated_conformer.insert_gates.
    """

    kind = "structured"
    model_kind = "gated"

    def __init__(self, regulariser, gate_optimizer, sites=SITES, threshold=0.5,
                 init_retention=0.95, temperature=0.5, hard=False, name="adrop"):
        self.name = name
        self.regulariser = regulariser
        self.initial_alpha = regulariser.alpha
        self.gate_optimizer = gate_optimizer
        self.gate_args = dict(sites=list(sites), threshold=threshold,
                              init_retention=init_retention, temperature=temperature, hard=hard)

    def attach(self, modules):
        insert_gates(modules["asr"], **self.gate_args)
        return modules

    def optimizers(self, modules):
        gate_params = [p for name, p in modules.named_parameters() if GATE_KEY_MARK in name]
        return {"gate_optimizer": self.gate_optimizer(gate_params)}

    def penalty(self, modules, progress):
        return self.regulariser(modules["asr"], progress)

    def keep_masks(self, modules):
        return gate_keep(modules["asr"])

    def epoch_summary(self, modules, progress):
        """Per-epoch gate visibility (docs/FORMATS.md, history.jsonl)."""
        asr = modules["asr"]
        return {
            "regulariser_target": float(self.regulariser.schedule.c(progress)),
            "regulariser_alpha": float(self.regulariser.alpha),
            "progress": progress,
            "params_if_shrunk": params_if_shrunk(asr),
            "gates": gate_summary(asr),
            "retentions": retention_distribution(asr),
        }

    def results_summary(self, modules):
        asr = modules["asr"]
        summary = gate_summary(asr)
        units = sum(g["units"] for g in summary)
        return {"gates": {
            "threshold": self.gate_args["threshold"],
            "kept_fraction": sum(g["kept"] for g in summary) / max(1, units),
            "params_if_shrunk": params_if_shrunk(asr),
            "retentions": retention_distribution(asr),
        }}

    def settings(self):
        schedule = self.regulariser.schedule
        return {**self.gate_args, "alpha": self.initial_alpha,
                "keep_target": self.regulariser.keep_target,
                "target_params": self.regulariser.target_params,
                "schedule": {"shape": schedule.shape, "start": schedule.start,
                             "end": schedule.end, "span": schedule.span,
                             "delay": schedule.delay}}

    def state_dict(self):
        """Budget mode adapts alpha as it goes: a resumed run must go on from the same alpha."""
        return {"alpha": self.regulariser.alpha, "calls": self.regulariser._calls}

    def load_state_dict(self, state):
        self.regulariser.alpha = state["alpha"]
        self.regulariser._calls = state["calls"]
