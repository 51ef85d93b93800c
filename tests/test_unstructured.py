"""Unstructured pruning (magnitude, PLATON, SEVEN): the schedule, each score against values
worked out by hand from known gradients, the one global ranking, and masks that hold."""

import math

import pytest
import torch

from conformer_prune.errors import InputError
from conformer_prune.methods.unstructured import (
    CubicKeepSchedule,
    MagnitudePruning,
    PlatonPruning,
    SevenPruning,
    scored_parameters,
    top_masks,
)
from conformer_prune.model import build_asr_modules
from tiny import TINY_ARCH


# ----- schedule ------------------------------------------------------------------------------


def test_cubic_schedule_three_phases():
    schedule = CubicKeepSchedule(final_keep=0.2, t_i=0.1, t_f=0.3)
    # Phase 1: everything kept up to t_i.
    assert schedule.keep(0.0) == 1.0 and schedule.keep(0.1) == 1.0
    assert not schedule.pruning(0.1) and schedule.pruning(0.1001)
    # Phase 2: r = 0.2 + 0.8 (1 - (t - 0.1) / 0.6)^3; at t = 0.4 the fall is half done.
    assert schedule.keep(0.4) == pytest.approx(0.2 + 0.8 * 0.5 ** 3)
    assert schedule.keep(0.7) == pytest.approx(0.2)
    assert schedule.pruning(0.7) and not schedule.frozen(0.7)
    # Phase 3: the final keep ratio, mask frozen.
    assert schedule.keep(0.71) == 0.2 and schedule.frozen(0.71) and not schedule.pruning(0.71)
    assert schedule.keep(1.0) == 0.2


@pytest.mark.parametrize("args, key", [
    ({"final_keep": 0.0}, "prune_final_keep"),
    ({"final_keep": 1.5}, "prune_final_keep"),
    ({"final_keep": 0.3, "t_i": 0.5, "t_f": 0.5}, "prune_t_i"),
    ({"final_keep": 0.3, "t_i": -0.1}, "prune_t_i"),
])
def test_bad_schedule_settings_name_the_key(args, key):
    with pytest.raises(InputError, match=key):
        CubicKeepSchedule(**args)


# ----- one ranking over all tensors ---------------------------------------------------------


def test_the_threshold_is_global_not_per_layer():
    large = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    small = torch.tensor([[0.1, 0.4], [0.2, 0.3]])
    masks = top_masks([large, small], keep_ratio=0.5)
    assert masks[0].all() and not masks[1].any()  # per layer it would keep half of each
    masks = top_masks([large, small], keep_ratio=0.75)
    assert masks[0].all() and masks[1].tolist() == [[False, True], [False, True]]


def _method_on(cls, params, **kwargs):
    """A method on hand-made parameters, without a dense run to load."""
    method = cls(dense_run="unused", final_keep=kwargs.pop("final_keep", 0.5),
                 t_i=kwargs.pop("t_i", 0.0), t_f=kwargs.pop("t_f", 0.0), **kwargs)
    method.params = [(f"p{i}", p) for i, p in enumerate(params)]
    return method


def _step(method, progress, grads):
    for (_, param), grad in zip(method.params, grads):
        param.grad = torch.tensor(grad)
    method.after_optimizer_step({}, progress)


def test_magnitude_zeroes_the_smallest_weights_of_all_tensors():
    a = torch.nn.Parameter(torch.tensor([3.0, -0.5, 2.0]))
    b = torch.nn.Parameter(torch.tensor([-4.0, 0.1, 1.0]))
    method = _method_on(MagnitudePruning, [a, b], final_keep=0.5)
    _step(method, 1.0, [[0.0] * 3, [0.0] * 3])
    assert a.tolist() == [3.0, 0.0, 2.0] and b.tolist() == [-4.0, 0.0, 0.0]
    assert method.sparsity() == {"scored": 6, "scored_nonzero": 3, "scored_keep_fraction": 0.5}


# ----- PLATON ---------------------------------------------------------------------------------


def test_platon_score_is_the_windowed_ema_of_importance_times_its_uncertainty():
    """window 2, b1 0.5, b2 0.5, one weight w = 2 (before the freeze nothing is masked here:
    keep 1). Importance |w g|: steps 1-2 give 2 and 4 (window mean 3), steps 3-4 give 6 and 2
    (mean 4); step 3 folds in the first window, step 5 the second."""
    w = torch.nn.Parameter(torch.tensor([2.0]))
    method = _method_on(PlatonPruning, [w], final_keep=1.0, b1=0.5, b2=0.5, window=2)
    for g in (1.0, 2.0, 3.0, 1.0):
        _step(method, 0.5, [[g]])
    # After step 3: I_bar = 0.5 * 0 + 0.5 * 3 = 1.5, U_bar = 0.5 * |3 - 1.5| = 0.75.
    # Step 4 only averages the window in progress: (6 + 2) / 2 = 4.
    assert method.window_mean[0].item() == pytest.approx(4.0)
    assert method.scores()[0].item() == pytest.approx(1.5 * 0.75)
    _step(method, 0.5, [[0.5]])  # step 5: fold in the second window
    i_bar = 0.5 * 1.5 + 0.5 * 4.0
    u_bar = 0.5 * 0.75 + 0.5 * abs(4.0 - i_bar)
    assert method.scores()[0].item() == pytest.approx(i_bar * u_bar)


# ----- SEVEN ----------------------------------------------------------------------------------


def test_seven_score_by_hand_and_pruned_weights_never_come_back():
    """a1 0.5, a2 0.5, weights (1, 1): gradients (2, 1) then (0, 4).
    Step 1: m = (1, .5), v = (2, .5), m_hat = (2, 1), v_hat = (4, 1): S = |w g m_hat / sqrt v_hat|
    = (2 * 2 / 2, 1 * 1 / 1) = (2, 1); keep 0.5 prunes the second weight.
    Step 2: its gradient is large but its score is held at -inf, so it stays pruned."""
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    method = _method_on(SevenPruning, [w], final_keep=0.5, a1=0.5, a2=0.5)
    _step(method, 0.5, [[2.0, 1.0]])
    assert method.scores()[0].tolist() == [pytest.approx(2.0), -math.inf]
    assert w.tolist() == [1.0, 0.0]
    with torch.no_grad():
        w[1] = 3.0  # as if the optimiser had moved it
    _step(method, 0.6, [[0.0, 4.0]])
    assert w.tolist() == [1.0, 0.0]
    assert method.scores()[0][1].item() == -math.inf


def test_seven_scores_nothing_outside_its_window():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    method = _method_on(SevenPruning, [w], final_keep=0.5, t_i=0.2, t_f=0.2)
    _step(method, 0.1, [[1.0, 1.0]])
    assert method.score is None and w.tolist() == [1.0, 2.0]


def test_masks_freeze_after_the_window_and_keep_weights_at_zero():
    a = torch.nn.Parameter(torch.tensor([3.0, 1.0, 2.0, 0.5]))
    method = _method_on(MagnitudePruning, [a], final_keep=0.5, t_i=0.0, t_f=0.5)
    _step(method, 0.5, [[0.0] * 4])  # last pruning step: keep 0.5
    assert a.tolist() == [3.0, 0.0, 2.0, 0.0]
    with torch.no_grad():
        a.copy_(torch.tensor([0.1, 9.0, 0.2, 9.0]))  # the optimiser moved every weight
    _step(method, 0.9, [[0.0] * 4])  # frozen: the same mask, not a new ranking
    assert a.tolist() == pytest.approx([0.1, 0.0, 0.2, 0.0])


# ----- which tensors ----------------------------------------------------------------------------


def test_scored_tensors_are_the_encoder_layers_weight_matrices():
    model = build_asr_modules(**TINY_ARCH)
    names = [name for name, _ in scored_parameters(model)]
    assert names and all(name.startswith(("layer0.", "layer1.")) for name in names)
    assert any("ffn_module1" in n for n in names) and any("in_proj_weight" in n for n in names)
    assert any("convolution_module.conv.weight" in n for n in names)
    assert not any(n.endswith("bias") or "norm" in n or "pos_bias" in n for n in names)
