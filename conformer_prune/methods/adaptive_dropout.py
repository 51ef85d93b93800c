"""Adaptive dropout (Kubo et al. 2024) as a pruning method: gates, regulariser, gate optimizer.

The gates and the regulariser themselves are in gates.py and gated_conformer.py; this module is
what the training sees of them (METHODS.md section 1, docs/PRUNING.md).
"""

import logging

from conformer_prune.gated_conformer import (
    SITES,
    gate_keep,
    gate_summary,
    insert_gates,
    params_if_shrunk,
)
from conformer_prune.errors import InputError
from conformer_prune.gates import iter_gates, retention_distribution
from conformer_prune.methods.base import PruningMethod
from conformer_prune.model import GATE_KEY_MARK

logger = logging.getLogger(__name__)


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
    start_below_cer : float, optional
        Start on learning: the target stays at its start (the schedule's clock held at its
        `delay`) until the first epoch whose greedy dev CER is at most this, or until
        `start_latest` of training; from there the rest of the schedule (fall, then commit
        phase) runs on the training left, compressed to fit. None: the schedule runs on the
        step count alone. Why: a seed that is slow to leave CTC's blank plateau had its gates
        closed on a model that had learned nothing yet, and lost its WER. Measured on that seed
        of the mini recipe, it did not win the WER back (docs/TRAINING.md, session 13).
    start_latest : float
        The latest progress at which the fall starts, learned or not (the budget must be met).
    quiet_before_start : bool
        Until the fall starts, training passes every unit (no Gumbel noise), so the model
        learns as the dense one does. Needs `start_below_cer`.
    """

    kind = "structured"
    model_kind = "gated"

    def __init__(self, regulariser, gate_optimizer, sites=SITES, threshold=0.5,
                 init_retention=0.95, temperature=0.5, hard=False, name="adrop",
                 start_below_cer=None, start_latest=0.5, quiet_before_start=False):
        self.name = name
        self.regulariser = regulariser
        self.initial_alpha = regulariser.alpha
        self.gate_optimizer = gate_optimizer
        self.gate_args = dict(sites=list(sites), threshold=threshold,
                              init_retention=init_retention, temperature=temperature, hard=hard)
        delay = regulariser.schedule.delay
        if start_below_cer is not None and not 0 < start_below_cer <= 100:
            raise InputError(f"gate_start_below_cer: {start_below_cer!r} is not valid; "
                             "expected a CER in percent, in (0, 100], or null")
        if not delay <= start_latest < 1:
            raise InputError(f"gate_start_latest: {start_latest!r} is not valid; expected a "
                             f"fraction of training in [gate_target_delay = {delay}, 1)")
        if quiet_before_start and start_below_cer is None:
            raise InputError("gate_quiet_before_start: True needs gate_start_below_cer (it "
                             "says when the quiet start ends)")
        self.start_below_cer = start_below_cer
        self.start_latest = start_latest
        self.quiet_before_start = quiet_before_start
        self.fall_start = None  # the progress at which the fall started (start on learning)
        self.quiet = False
        self._gates = []

    def attach(self, modules):
        insert_gates(modules["asr"], **self.gate_args)
        self._gates = [gate for _, gate in iter_gates(modules["asr"])]
        self._set_quiet()
        return modules

    def _waiting(self, progress):
        """Start on learning: True while the fall has not started and may still wait."""
        return (self.start_below_cer is not None and self.fall_start is None
                and progress < self.start_latest)

    def _set_quiet(self, progress=0.0):
        """Quiet gates while waiting (with quiet_before_start); the gates are touched only
        when that changes, since penalty() asks on every training step."""
        quiet = self.quiet_before_start and self._waiting(progress)
        if quiet != self.quiet:
            self._quiet_gates(quiet)

    def _quiet_gates(self, quiet):
        self.quiet = quiet
        for gate in self._gates:
            gate.quiet = quiet

    def schedule_progress(self, progress):
        """The regulariser's clock: training progress, or with start on learning, held at the
        schedule's delay until the start, then running from it over the training left so that
        the schedule's end (1) is the end of training."""
        if self.start_below_cer is None:
            return progress
        delay = self.regulariser.schedule.delay
        if self._waiting(progress):
            return min(progress, delay)
        start = max(delay, self.fall_start if self.fall_start is not None else self.start_latest)
        return min(1.0, delay + (progress - start) * (1.0 - delay) / (1.0 - start))

    def after_validation(self, modules, progress, rates):
        if self._waiting(progress) and rates["cer"] <= self.start_below_cer:
            self.fall_start = progress
            logger.info("adaptive dropout: dev CER %.2f <= %s at progress %.3f: the target "
                        "starts to fall", rates["cer"], self.start_below_cer, progress)
        self._set_quiet(progress)

    def optimizers(self, modules):
        gate_params = [p for name, p in modules.named_parameters() if GATE_KEY_MARK in name]
        return {"gate_optimizer": self.gate_optimizer(gate_params)}

    def penalty(self, modules, progress):
        self._set_quiet(progress)  # for the next step's forward (start_latest may have passed)
        return self.regulariser(modules["asr"], self.schedule_progress(progress))

    def keep_masks(self, modules):
        return gate_keep(modules["asr"])

    def epoch_summary(self, modules, progress):
        """Per-epoch gate visibility (docs/FORMATS.md, history.jsonl)."""
        asr = modules["asr"]
        clock = self.schedule_progress(progress)
        return {
            "regulariser_target": float(self.regulariser.schedule.c(clock)),
            "schedule_progress": clock,
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
                             "delay": schedule.delay},
                "start_below_cer": self.start_below_cer, "start_latest": self.start_latest,
                "quiet_before_start": self.quiet_before_start}

    def state_dict(self):
        """Budget mode adapts alpha as it goes: a resumed run must go on from the same alpha."""
        return {"alpha": self.regulariser.alpha, "calls": self.regulariser._calls,
                "fall_start": self.fall_start, "quiet": self.quiet}

    def load_state_dict(self, state):
        self.regulariser.alpha = state["alpha"]
        self.regulariser._calls = state["calls"]
        # (both absent in checkpoints before session 13, which had neither)
        self.fall_start = state.get("fall_start")
        # A resumed run's first forward comes before any hook: the gates' mode is set here.
        self._quiet_gates(state.get("quiet", False))
