"""Adaptive dropout gates (Kubo et al. 2024) and the regulariser that pushes them toward pruning.

The gate knows nothing of the model it sits in: it owns one logit per unit, samples a relaxed
Bernoulli mask in training and a deterministic 0/1 mask in evaluation. The gated modules
(gated_conformer.py) decide where masks are applied and tell each gate what one unit costs in
parameters (`unit_cost`), which the cost-weighted regulariser and the budget mode read.

See docs/PRUNING.md for the formulas and the choices made here.
"""

import math

import torch
from torch import nn

from conformer_prune.errors import InputError

# Uniform noise is drawn from [EPS, 1 - EPS] so that log(u) and log(1 - u) stay finite.
_EPS = 1e-6


def _require(ok, key, value, expected):
    """A start-up error naming the YAML key (hparams/*.yaml) that holds a bad setting."""
    if not ok:
        raise InputError(f"{key}: {value!r} is not valid; expected {expected}")


def logit(p):
    """log(p / (1 - p)) of a probability given as a float."""
    return math.log(p / (1.0 - p))


class AdaptiveDropout(nn.Module):
    """Dropout with a learned retention probability per unit.

    Training: a binary-concrete (Gumbel-sigmoid) sample per example and unit,
    `m = sigmoid((beta + log u - log(1 - u)) / temperature)`; with `hard=True` the forward value is
    `m >= 0.5` and the gradient is that of the relaxed sample (straight-through).
    Evaluation: `m = 1` if `sigmoid(beta) >= threshold` else 0. Kept units are NOT scaled by their
    retention, so a shrunk model (closed units removed) computes exactly what the gated model does.

    Arguments
    ---------
    units : int
        Number of gated units.
    unit_dim : int
        Dimension of the input that holds the units in `forward` (dimension 0 is the batch).
    init_retention : float
        Initial retention probability p of every unit (logits start at log(p / (1 - p))).
    temperature : float
        Temperature of the relaxation (smaller: closer to 0/1 samples, noisier gradients).
    hard : bool
        Straight-through variant: 0/1 forward values in training.
    threshold : float
        Evaluation rule: a unit is kept iff its retention is at least this.
    """

    def __init__(
        self, units, unit_dim=-1, init_retention=0.95, temperature=0.5, hard=False, threshold=0.5
    ):
        super().__init__()
        if unit_dim == 0:
            raise ValueError("AdaptiveDropout: dimension 0 is the batch, units cannot be there")
        _require(0.0 < init_retention < 1.0, "gate_init_retention", init_retention,
                 "a probability strictly between 0 and 1 (its logit must be finite)")
        _require(temperature > 0.0, "gate_temperature", temperature, "positive")
        _require(0.0 < threshold < 1.0, "gate_threshold", threshold,
                 "strictly between 0 and 1 (0 keeps every unit, 1 none)")
        self.units = units
        self.unit_dim = unit_dim
        self.temperature = temperature
        self.hard = hard
        self.threshold = threshold
        # Parameters one unit controls; the gated module that owns the gate sets it.
        self.unit_cost = 1.0
        # Quiet: training passes every unit (mask 1, no noise), as evaluation does at the start
        # (the method sets it: AdaptiveDropoutMethod's quiet start).
        self.quiet = False
        self.logits = nn.Parameter(torch.full((units,), logit(init_retention)))

    def retention(self):
        """Retention probabilities p = sigmoid(beta), shape (units,)."""
        return torch.sigmoid(self.logits)

    def keep_mask(self):
        """Boolean evaluation mask: which units survive the shrink."""
        return self.retention().detach() >= self.threshold

    def expected_kept(self):
        """Expected number of open units, sum of p (differentiable)."""
        return self.retention().sum()

    def mask(self, batch_size):
        """The mask to multiply with: (batch_size, units) in training, (units,) in evaluation."""
        if not self.training:
            return self.keep_mask().to(self.logits.dtype)
        if self.quiet:
            return torch.ones(self.units, dtype=self.logits.dtype, device=self.logits.device)
        # Noise in float32 even for half-precision logits, where 1 - _EPS would round to 1.
        u = torch.rand(batch_size, self.units, device=self.logits.device).clamp(_EPS, 1.0 - _EPS)
        noise = torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid((self.logits.float() + noise) / self.temperature)
        soft = soft.to(self.logits.dtype)
        return _StraightThrough.apply(soft) if self.hard else soft

    def forward(self, x):
        """Multiplies x (batch first) by the mask along `unit_dim`."""
        return x * self.broadcast(self.mask(x.shape[0]), x)

    def broadcast(self, mask, x):
        """Reshapes a mask from `mask()` so that it broadcasts against x along `unit_dim`."""
        shape = [1] * x.dim()
        shape[self.unit_dim] = self.units
        if mask.dim() == 2:
            shape[0] = mask.shape[0]
        return mask.view(shape)

    def extra_repr(self):
        return (
            f"units={self.units}, unit_dim={self.unit_dim}, temperature={self.temperature}, "
            f"hard={self.hard}, threshold={self.threshold}, unit_cost={self.unit_cost}"
        )


class _StraightThrough(torch.autograd.Function):
    """Forward: the sample rounded to exactly 0 or 1; backward: the relaxed sample's gradient."""

    @staticmethod
    def forward(ctx, soft):
        return (soft >= 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def iter_gates(module):
    """(name, gate) pairs of every AdaptiveDropout inside module."""
    for name, sub in module.named_modules():
        if isinstance(sub, AdaptiveDropout):
            yield name, sub


# A retention counts as polarised when it is below this or above 1 minus this: far enough from
# the threshold that the gate's training-time behaviour (a unit dropped with probability 1 - p)
# is close to its evaluation-time decision.
POLARISED_MARGIN = 0.1


def retention_distribution(module, bins=10, margin=POLARISED_MARGIN):
    """How a model's retentions spread over [0, 1], for logs and dashboards.

    Returns {"bins", "counts" (units per equal-width bin of [0, 1], the last bin closed),
    "margin", "polarised_fraction" (share of units with p < margin or p > 1 - margin)}.
    """
    gates = [gate for _, gate in iter_gates(module)]
    if not gates:
        raise ValueError("retention_distribution: the model has no AdaptiveDropout gates")
    p = torch.cat([gate.retention().detach().float().flatten() for gate in gates]).cpu()
    counts = torch.histc(p, bins=bins, min=0.0, max=1.0)
    polarised = ((p < margin) | (p > 1.0 - margin)).float().mean()
    return {
        "bins": bins,
        "counts": [int(c) for c in counts],
        "margin": margin,
        "polarised_fraction": float(polarised),
    }


SCHEDULE_SHAPES = ("linear", "cosine", "exponential", "step", "constant")


class TargetSchedule:
    """The regulariser's target logit c as a function of training progress in [0, 1].

    c stays at `start` until `delay`, falls to `end` over the next `span` (both fractions of
    training), then stays at `end`. Shapes of the fall (s = fraction of the fall done):
    linear `start + (end - start) s`; cosine (slow, fast, slow); exponential (fast first,
    `(1 - exp(-rate s)) / (1 - exp(-rate))`); step (jumps to `end` at `delay`); constant (`end`
    throughout: the plain fixed-target L2 of the paper).
    """

    def __init__(self, shape="linear", start=3.0, end=-3.0, span=1.0, delay=0.0, rate=5.0):
        _require(shape in SCHEDULE_SHAPES, "regulariser schedule shape", shape,
                 f"one of {', '.join(SCHEDULE_SHAPES)}")
        _require(span > 0, "gate_target_span", span, "a positive fraction of training")
        _require(0 <= delay < 1, "gate_target_delay", delay, "a fraction of training in [0, 1)")
        _require(math.isfinite(start), "gate_target_start", start, "a finite logit")
        _require(math.isfinite(end), "gate_target_end", end, "a finite logit")
        _require(rate > 0, "regulariser schedule rate", rate, "positive (exponential shape)")
        self.shape = shape
        self.start = start
        self.end = end
        self.span = span
        self.delay = delay
        self.rate = rate

    def fraction(self, progress):
        """How far the target has fallen from start (0) to end (1)."""
        if self.shape == "constant":
            return 1.0
        if progress < self.delay:
            return 0.0
        if self.shape == "step":
            return 1.0
        s = min(1.0, (progress - self.delay) / self.span)
        if self.shape == "linear":
            return s
        if self.shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * s))
        return (1.0 - math.exp(-self.rate * s)) / (1.0 - math.exp(-self.rate))

    def __call__(self, progress):
        return self.c(progress)

    @property
    def fall_ends(self):
        """Training progress at which the selection (the fall) is over: `delay + span` for
        every shape, the step's jump and the constant target included (they select units
        for that long too), so that the commit phase starts at the same point for all."""
        return self.delay + self.span

    def fall_ended(self, progress):
        return progress >= self.fall_ends

    def c(self, progress):
        """Target logit at a training progress in [0, 1]."""
        return self.start + (self.end - self.start) * self.fraction(progress)


def _unit_costs(gates, like):
    """Each unit's `unit_cost` (the parameters it controls), in `gates` order, as a tensor of
    `like`'s dtype and device."""
    return torch.cat([like.new_full((g.units,), float(g.unit_cost)) for g in gates])


class RetentionRegulariser:
    """R(beta; t) = alpha * sum_d w_d (beta_d - c(t))^2 over every gate of a model.

    Arguments
    ---------
    alpha : float
        Regularisation weight (adapted in place in budget mode).
    schedule : TargetSchedule
        The target logit c(progress).
    cost_weighted : bool
        w_d = parameters unit d controls (its gate's `unit_cost`), normalised to mean 1 over all
        units; otherwise w_d = 1.
    normalise : str
        "mean" (default) divides the sum by the number of units, so that alpha does not depend on
        model size and R stays of order alpha * (beta - c)^2; "sum" is the paper's plain sum.
    target_params : int, optional
        Budget mode: every `budget_every` calls, alpha is multiplied by
        `exp(budget_gain * clip((P - B(t)) / (P_dense - target_params), -1, 1))`, where P is the
        expected parameter count (dense count minus, per gate, unit_cost * (units - sum p)) and
        B(t) = P_dense - (P_dense - target_params) * schedule.fraction(progress) is the budget
        trajectory: alpha grows while the model is above its budget and shrinks below it.
    keep_target : float, optional
        Commit phase: once the target has finished falling (at `delay + span` of training, for
        every schedule shape: `TargetSchedule.fall_ends`), units
        whose retention is at or above their gate's threshold are pulled toward this logit
        instead of c(t); units below it keep c(t). Why: the falling target selects units, but a
        survivor held by one common target settles where the loss's push up balances the pull
        down, often at p = 0.3-0.8, where training still drops it part of the time and the
        evaluation mask never does. Splitting the target by side makes the retentions polarise
        (docs/TRAINING.md); a unit the loss fights for can still cross the threshold.
        In budget mode the side is not the threshold but the budget: the units kept are the
        most retained ones whose parameters fit `target_params` (`budget_keep`), recomputed
        every step. Why: the threshold side keeps whatever the fall left, and how much that is
        depends on how fast the model learned (at seed 2024 it ended 29% under its budget:
        docs/TRAINING.md); ranking fixes the size and lets the fall decide only the order.
    """

    def __init__(
        self,
        alpha,
        schedule,
        cost_weighted=False,
        normalise="mean",
        target_params=None,
        budget_gain=0.1,
        budget_every=100,
        alpha_bounds=(1e-6, 1e3),
        keep_target=None,
    ):
        if normalise not in ("mean", "sum"):
            raise ValueError(f"RetentionRegulariser: normalise {normalise!r} not in mean, sum")
        _require(alpha > 0, "gate_alpha", alpha, "positive")
        _require(int(budget_every) >= 1, "gate_budget_every", budget_every, "at least 1 step")
        _require(target_params is None or target_params > 0, "gate_target_params",
                 target_params, "a positive parameter count, or null")
        if keep_target is not None and schedule.fall_ends > 1.0:
            # The fall would not end before training does, so the commit phase would never run.
            raise InputError(
                f"RetentionRegulariser: keep_target is set but the target falls until "
                f"delay + span = {schedule.delay} + {schedule.span} > 1 (the end of training), "
                "so the commit phase would never start; lower gate_target_delay or "
                "gate_target_span, or set gate_keep_target: null")
        self.alpha = alpha
        self.schedule = schedule
        self.cost_weighted = cost_weighted
        self.normalise = normalise
        self.target_params = target_params
        self.budget_gain = budget_gain
        self.budget_every = budget_every
        self.alpha_bounds = alpha_bounds
        self.keep_target = keep_target
        self.target = schedule.c(0.0)  # last c(t), for logging
        self._calls = 0
        self._dense_params = None

    def __call__(self, model, progress):
        """The regularisation term (a scalar tensor) for the model's gates at this progress."""
        gates = [gate for _, gate in iter_gates(model)]
        if not gates:
            raise ValueError("RetentionRegulariser: the model has no AdaptiveDropout gates")
        self.target = self.schedule.c(progress)
        if self.target_params is not None:
            self._dense_count(model)
            self._calls += 1
            if self._calls % self.budget_every == 0:
                self.adapt_alpha(model, progress)
        logits = torch.cat([gate.logits for gate in gates])
        squares = (logits - self._unit_targets(gates, progress)) ** 2
        if self.cost_weighted:
            weights = _unit_costs(gates, logits)
            squares = squares * (weights / weights.mean())
        total = squares.sum() if self.normalise == "sum" else squares.mean()
        return self.alpha * total

    def _unit_targets(self, gates, progress):
        """c(t) for every unit, or per side (of the threshold, or of the budget in budget mode)
        in the commit phase."""
        if self.keep_target is None or not self.schedule.fall_ended(progress):
            return self.target
        if self.target_params is None:
            kept = torch.cat([gate.keep_mask() for gate in gates])
        else:
            kept = self.budget_keep(gates)
        return torch.where(kept, self.keep_target, self.target).to(gates[0].logits.dtype)

    def budget_keep(self, gates):
        """Budget mode's kept side (bool per unit, in `gates` order): units by falling logit,
        taken while the parameters they control (`unit_cost`) and the ungated rest of the
        model fit `target_params`. Needs the dense count (`_dense_count`) first."""
        with torch.no_grad():
            logits = torch.cat([gate.logits for gate in gates])
            costs = _unit_costs(gates, torch.empty(0, dtype=torch.float64))
            ungated = self._dense_params - float(costs.sum())
            order = torch.argsort(logits.cpu(), descending=True, stable=True)
            fits = torch.cumsum(costs[order], 0) <= self.target_params - ungated
            kept = torch.zeros(len(order), dtype=torch.bool)
            kept[order[fits]] = True
        return kept.to(logits.device)

    def _dense_count(self, model):
        """The model's parameter count without its gate logits (cached: it never changes)."""
        if self._dense_params is None:
            gate_params = {id(g.logits) for _, g in iter_gates(model)}
            self._dense_params = sum(
                p.numel() for p in model.parameters() if id(p) not in gate_params
            )
            if self.target_params is not None and self.target_params >= self._dense_params:
                raise InputError(
                    f"gate_target_params: {self.target_params} is not below the model's "
                    f"{self._dense_params} parameters (gate logits not counted), so there is "
                    "nothing to prune; set a smaller budget, or null for no budget")
        return self._dense_params

    def expected_params(self, model):
        """Expected parameter count after shrink, from the gates' retentions (a float)."""
        self._dense_count(model)
        with torch.no_grad():
            closed = sum(
                float(g.unit_cost) * (g.units - float(g.expected_kept()))
                for _, g in iter_gates(model)
            )
        return self._dense_params - closed

    def adapt_alpha(self, model, progress):
        """Budget mode: one multiplicative step of alpha toward the budget trajectory."""
        now = self.expected_params(model)
        removable = self._dense_params - self.target_params
        budget = self._dense_params - removable * self.schedule.fraction(progress)
        error = max(-1.0, min(1.0, (now - budget) / max(removable, 1)))
        low, high = self.alpha_bounds
        self.alpha = min(high, max(low, self.alpha * math.exp(self.budget_gain * error)))
