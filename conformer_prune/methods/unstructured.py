"""Unstructured pruning during fine-tuning: magnitude, PLATON and SEVEN (METHODS.md section 2).

Each starts from the trained dense run of the same recipe (its last checkpoint, model and
feature normaliser), fine-tunes it, and zeroes single weights as training goes on:

- the scored tensors are the weight matrices of the Conformer encoder layers (both FFNs, the
  attention projections, the convolution module's pointwise and depthwise convolutions): every
  weight of an encoder layer with two or more dimensions. The same tensors for all three
  methods, the region the structured methods prune too; biases, LayerNorms, the CNN front end,
  the decoder and the output layers are not scored (PLATON's code also scores biases; here the
  three methods compare on one set of tensors).
- the keep ratio follows the cubic schedule (`CubicKeepSchedule`) in fractions of training:
  all kept until `t_i`, falling as a cube to `final_keep` at `1 - t_f`, then fixed; from `1 - t_f`
  on the mask is frozen and training goes on with it.
- at each step the globally top-scored `round(r N)` elements of all scored tensors are kept (one
  ranking over all layers, not per layer) and the rest set to exactly zero, right after the
  optimiser's step (the authors' order: the pruner runs after `optimizer.step()` and reads the
  step's gradients, which SpeechBrain clears only after that; `after_optimizer_step`).

The scores:
- magnitude: `|W|`.
- PLATON: `I = |W * grad W|` averaged over windows of `window` steps; at each window's end
  `I_bar <- b1 I_bar + (1 - b1) I_win`, `U_bar <- b2 U_bar + (1 - b2) |I_win - I_bar|`, score
  `I_bar * U_bar` (so the score lags one window). No persistent mask before the freeze: a zeroed
  weight comes back if its score rises.
- SEVEN: inside the pruning window (`t_i < t <= 1 - t_f`), every step, `g = |grad W|`, Adam-style
  moments from the window's start `m <- a1 m + (1 - a1) g`, `v <- a2 v + (1 - a2) g^2`,
  bias-corrected `m_hat`, `v_hat`, and the cumulative score `S += |W * g * m_hat / (sqrt(v_hat) +
  1e-9)|`. A pruned element's score is set to -inf: it ranks last and never comes back.
"""

import math

import torch

from conformer_prune.errors import InputError
from conformer_prune.methods.base import PruningMethod
from conformer_prune.methods.structured_magnitude import load_dense_run
from conformer_prune.sites import encoder_layers


class CubicKeepSchedule:
    """Keep ratio r(t) over training progress t in [0, 1] (both papers' cubic schedule).

    r = start_keep for t <= t_i; r = final_keep + (start_keep - final_keep) *
    (1 - (t - t_i) / (1 - t_i - t_f))^3 for t_i < t <= 1 - t_f; r = final_keep after, when the
    mask is frozen.
    """

    def __init__(self, final_keep, t_i=0.1, t_f=0.3, start_keep=1.0):
        if not 0.0 < final_keep <= start_keep <= 1.0:
            raise InputError(f"prune_final_keep: {final_keep!r} is not valid; expected a keep "
                             f"ratio in (0, {start_keep}]")
        if t_i < 0 or t_f < 0 or t_i + t_f >= 1.0:
            raise InputError(f"prune_t_i, prune_t_f: {t_i!r}, {t_f!r} are not valid; expected "
                             "fractions of training >= 0 with t_i + t_f < 1")
        self.final_keep, self.start_keep = final_keep, start_keep
        self.t_i, self.t_f = t_i, t_f

    def keep(self, progress):
        if progress <= self.t_i:
            return self.start_keep
        if self.frozen(progress):
            return self.final_keep
        fall = (progress - self.t_i) / (1.0 - self.t_i - self.t_f)
        return self.final_keep + (self.start_keep - self.final_keep) * (1.0 - fall) ** 3

    def pruning(self, progress):
        """Inside the pruning window (masks chosen from the scores at each step)."""
        return self.t_i < progress <= 1.0 - self.t_f

    def frozen(self, progress):
        return progress > 1.0 - self.t_f


def scored_parameters(asr):
    """(name, parameter) of every weight matrix of the encoder layers, in a fixed order."""
    found = []
    for i, layer in enumerate(encoder_layers(asr)):
        for name, param in layer.named_parameters():
            # Weight matrices and convolution kernels; not the attention's position biases
            # (pos_bias_u/v, 2-D too), the biases, or the norms.
            if param.dim() >= 2 and name.endswith("weight"):
                found.append((f"layer{i}.{name}", param))
    return found


def top_masks(scores, keep_ratio):
    """Keep masks over a list of score tensors: the globally top `round(keep_ratio N)`."""
    flat = torch.cat([s.flatten() for s in scores])
    keep = int(round(keep_ratio * flat.numel()))
    mask_flat = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        mask_flat[torch.topk(flat, keep, sorted=False).indices] = True
    masks, start = [], 0
    for score in scores:
        masks.append(mask_flat[start:start + score.numel()].view_as(score))
        start += score.numel()
    return masks


class UnstructuredPruning(PruningMethod):
    """The schedule, the global ranking and the masking; subclasses give the score.

    Arguments
    ---------
    dense_run : str
        The dense training run (results/<name>/<seed>) whose last checkpoint is fine-tuned.
    final_keep : float
        Fraction of the scored weights kept at the end.
    t_i, t_f : float
        Fractions of training before the pruning starts and after the mask freezes.
    """

    kind = "unstructured"
    model_kind = "sparse"
    name = "unstructured"

    def __init__(self, dense_run, final_keep, t_i=0.1, t_f=0.3, name=None):
        self.dense_run = str(dense_run)
        self.schedule = CubicKeepSchedule(final_keep, t_i, t_f)
        self.name = name or self.name
        self.params = []
        self.masks = None  # bool tensors, one per scored parameter; None before any pruning
        self.steps = 0  # optimiser steps seen
        self.source = None

    def attach(self, modules):
        self.source = str(load_dense_run(modules, self.dense_run))
        self.params = scored_parameters(modules["asr"])
        return modules

    # ----- the hooks -----------------------------------------------------------------------

    def after_optimizer_step(self, modules, progress):
        self.steps += 1
        with torch.no_grad():
            self.update_scores(progress)
            if self.schedule.pruning(progress) or (self.schedule.frozen(progress)
                                                   and self.masks is None):
                self.masks = self.choose_masks(self.schedule.keep(progress))
            if self.masks is not None:
                for (_, param), mask in zip(self.params, self.masks):
                    param.mul_(mask)

    def update_scores(self, progress):
        """Updates the method's running statistics from this step's weights and gradients."""

    def choose_masks(self, keep_ratio):
        return top_masks(self.scores(), keep_ratio)

    def scores(self):
        raise NotImplementedError

    def epoch_summary(self, modules, progress):
        return {"prune_keep_target": self.schedule.keep(progress), **self.sparsity()}

    def results_summary(self, modules):
        return {"pruned_from": self.source, "sparsity": self.sparsity()}

    def sparsity(self):
        scored = sum(param.numel() for _, param in self.params)
        nonzero = sum(int(torch.count_nonzero(param)) for _, param in self.params)
        return {"scored": scored, "scored_nonzero": nonzero,
                "scored_keep_fraction": nonzero / max(1, scored)}

    def settings(self):
        return {"dense_run": self.dense_run, "final_keep": self.schedule.final_keep,
                "t_i": self.schedule.t_i, "t_f": self.schedule.t_f}

    # ----- checkpointed state ----------------------------------------------------------------

    def state_dict(self):
        return {"steps": self.steps, "masks": self.masks, **self.score_state()}

    def load_state_dict(self, state):
        self.steps, self.masks = state["steps"], self.on_param_devices(state["masks"])
        self.load_score_state(state)

    def on_param_devices(self, tensors):
        """Saved per-parameter tensors (loaded on the CPU) moved to their parameters' devices."""
        if tensors is None:
            return None
        return [t.to(param.device) for t, (_, param) in zip(tensors, self.params)]

    def score_state(self):
        return {}

    def load_score_state(self, state):
        pass


class MagnitudePruning(UnstructuredPruning):
    """Unstructured magnitude pruning: score |W| at each masking step."""

    name = "magnitude"

    def scores(self):
        return [param.detach().abs() for _, param in self.params]


class PlatonPruning(UnstructuredPruning):
    """PLATON (Zhang et al. 2022): importance times its uncertainty, averaged per window."""

    name = "platon"

    def __init__(self, dense_run, final_keep, t_i=0.1, t_f=0.3, b1=0.85, b2=0.95, window=10,
                 name=None):
        super().__init__(dense_run, final_keep, t_i, t_f, name)
        if not (0 <= b1 < 1 and 0 <= b2 < 1 and int(window) >= 1):
            raise InputError(f"platon_b1, platon_b2, platon_window: {b1}, {b2}, {window} are not "
                             "valid; expected b1, b2 in [0, 1) and a window of at least 1 step")
        self.b1, self.b2, self.window = b1, b2, int(window)
        self.window_mean = self.ipt_bar = self.unc_bar = None

    def update_scores(self, progress):
        current = [(param * param.grad).abs() if param.grad is not None
                   else torch.zeros_like(param) for _, param in self.params]
        local = (self.steps - 1) % self.window  # 0 at the first step of a window
        if self.window_mean is None:
            self.window_mean = current
            self.ipt_bar = [torch.zeros_like(c) for c in current]
            self.unc_bar = [torch.zeros_like(c) for c in current]
            return
        if local == 0:  # the previous window is complete: fold it in, start a new one
            for mean, ipt, unc in zip(self.window_mean, self.ipt_bar, self.unc_bar):
                ipt.mul_(self.b1).add_(mean, alpha=1 - self.b1)
                unc.mul_(self.b2).add_((mean - ipt).abs(), alpha=1 - self.b2)
            self.window_mean = current
        else:
            for mean, now in zip(self.window_mean, current):
                mean.mul_(local / (local + 1)).add_(now, alpha=1 / (local + 1))

    def scores(self):
        return [ipt * unc for ipt, unc in zip(self.ipt_bar, self.unc_bar)]

    def settings(self):
        return {**super().settings(), "b1": self.b1, "b2": self.b2, "window": self.window}

    def score_state(self):
        return {"window_mean": self.window_mean, "ipt_bar": self.ipt_bar,
                "unc_bar": self.unc_bar}

    def load_score_state(self, state):
        self.window_mean = self.on_param_devices(state["window_mean"])
        self.ipt_bar = self.on_param_devices(state["ipt_bar"])
        self.unc_bar = self.on_param_devices(state["unc_bar"])


class SevenPruning(UnstructuredPruning):
    """SEVEN (Xiao et al. 2024): cumulative |W g| scaled by the gradient's signal to noise."""

    name = "seven"

    def __init__(self, dense_run, final_keep, t_i=0.1, t_f=0.3, a1=0.8, a2=0.9, name=None):
        super().__init__(dense_run, final_keep, t_i, t_f, name)
        if not (0 <= a1 < 1 and 0 <= a2 < 1):
            raise InputError(f"seven_a1, seven_a2: {a1}, {a2} are not valid; expected [0, 1)")
        self.a1, self.a2 = a1, a2
        self.window_steps = 0
        self.m = self.v = self.score = None

    def update_scores(self, progress):
        if not self.schedule.pruning(progress):
            return
        if self.m is None:
            self.m = [torch.zeros_like(p) for _, p in self.params]
            self.v = [torch.zeros_like(p) for _, p in self.params]
            self.score = [torch.zeros_like(p) for _, p in self.params]
        self.window_steps += 1
        k = self.window_steps
        for (_, param), m, v, score in zip(self.params, self.m, self.v, self.score):
            if param.grad is None:
                continue
            g = param.grad.abs()
            m.mul_(self.a1).add_(g, alpha=1 - self.a1)
            v.mul_(self.a2).add_(g * g, alpha=1 - self.a2)
            m_hat = m / (1 - self.a1 ** k)
            v_hat = v / (1 - self.a2 ** k)
            score.add_((param * g * m_hat / (v_hat.sqrt() + 1e-9)).abs())
        if self.masks is not None:  # pruned stays pruned
            for score, mask in zip(self.score, self.masks):
                score.masked_fill_(~mask, -math.inf)

    def scores(self):
        if self.score is None:  # a run too short for a step inside the window: magnitude
            return [param.detach().abs() for _, param in self.params]
        return self.score

    def choose_masks(self, keep_ratio):
        masks = super().choose_masks(keep_ratio)
        for score, mask in zip(self.score or [], masks):
            # A pruned element ranks last from now on, below kept ones whose score is still 0.
            score.masked_fill_(~mask, -math.inf)
        return masks

    def settings(self):
        return {**super().settings(), "a1": self.a1, "a2": self.a2}

    def score_state(self):
        return {"window_steps": self.window_steps, "m": self.m, "v": self.v,
                "score": self.score}

    def load_score_state(self, state):
        self.window_steps = state["window_steps"]
        self.m, self.v = self.on_param_devices(state["m"]), self.on_param_devices(state["v"])
        self.score = self.on_param_devices(state["score"])
