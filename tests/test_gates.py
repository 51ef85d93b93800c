"""Gates, schedules, regulariser and gate insertion on tiny random models (CPU, seconds)."""

import copy
import math

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from conformer_prune.errors import InputError
from conformer_prune.gated_conformer import (
    gate_summary,
    insert_gates,
    params_if_shrunk,
    set_threshold,
)
from conformer_prune.gates import (
    AdaptiveDropout,
    RetentionRegulariser,
    TargetSchedule,
    iter_gates,
    logit,
    retention_distribution,
)
from conformer_prune.methods.adaptive_dropout import AdaptiveDropoutMethod
from conformer_prune.model import build_asr_modules, count_params, param_state
from tiny import TINY_ARCH



def tiny_modules(seed=0):
    torch.manual_seed(seed)
    return build_asr_modules(**TINY_ARCH)


def encode(modules, feats, lens):
    return modules["Transformer"].encode(modules["CNN"](feats), lens)


# ------------------------------------------------------------------------ AdaptiveDropout


def test_gate_initial_state():
    gate = AdaptiveDropout(5, init_retention=0.9)
    assert gate.units == 5
    assert torch.allclose(gate.logits, torch.full((5,), math.log(9.0)))
    assert torch.allclose(gate.retention(), torch.full((5,), 0.9))
    assert torch.isclose(gate.expected_kept(), torch.tensor(4.5))
    assert gate.keep_mask().all()


def test_training_mask_is_relaxed_per_example_and_differentiable():
    torch.manual_seed(0)
    gate = AdaptiveDropout(6, temperature=0.5).train()
    x = torch.ones(4, 3, 6)
    y = gate(x)
    masks = y[:, 0, :]
    assert ((masks > 0) & (masks < 1)).all()
    assert torch.equal(y[:, 0], y[:, 2])  # one sample per example, shared over time
    assert not torch.equal(masks[0], masks[1])  # but different between examples
    y.sum().backward()
    assert gate.logits.grad is not None and (gate.logits.grad != 0).all()


def test_relaxed_mask_follows_retention():
    torch.manual_seed(0)
    gate = AdaptiveDropout(2).train()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([logit(0.9), logit(0.1)]))
    means = gate.mask(20000).detach().mean(0)
    # The binary concrete sample has mean p exactly in the limit tau -> 0 and is symmetric:
    assert means[0] > 0.8 and means[1] < 0.2
    assert abs(float(means[0] + means[1]) - 1.0) < 0.02


def test_hard_straight_through():
    torch.manual_seed(0)
    gate = AdaptiveDropout(8, hard=True, init_retention=0.5).train()
    mask = gate.mask(16)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    mask.sum().backward()
    assert (gate.logits.grad != 0).all()


def test_eval_is_deterministic_threshold_without_scaling():
    gate = AdaptiveDropout(4, unit_dim=1)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([2.0, -2.0, 0.0, 0.5]))
    gate.eval()
    x = torch.randn(3, 4, 5)
    y = gate(x)
    assert torch.equal(y[:, 0], x[:, 0]) and torch.equal(y[:, 3], x[:, 3])  # unscaled
    assert torch.equal(y[:, 2], x[:, 2])  # p = 0.5 >= threshold 0.5: kept
    assert (y[:, 1] == 0).all()
    assert torch.equal(gate(x), y)
    gate.threshold = 0.7
    assert gate.keep_mask().tolist() == [True, False, False, False]


def test_gate_rejects_batch_dimension():
    with pytest.raises(ValueError):
        AdaptiveDropout(3, unit_dim=0)


# ------------------------------------------------------------------------ TargetSchedule


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_schedule_falls_from_start_to_end(shape):
    schedule = TargetSchedule(shape, start=3.0, end=-1.0, span=0.5, delay=0.2)
    assert schedule.c(0.0) == schedule.c(0.2) == 3.0
    values = [schedule.c(0.2 + 0.05 * i) for i in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert schedule.c(0.7) == pytest.approx(-1.0)
    assert schedule.c(1.0) == pytest.approx(-1.0)
    assert -1.0 < schedule.c(0.45) < 3.0


def test_schedule_linear_midpoint_step_and_constant():
    assert TargetSchedule("linear", 2.0, -2.0).c(0.5) == pytest.approx(0.0)
    step = TargetSchedule("step", 2.0, -2.0, delay=0.3)
    assert step.c(0.29) == 2.0 and step.c(0.3) == -2.0
    assert TargetSchedule("constant", 2.0, -2.0).c(0.0) == -2.0
    with pytest.raises(ValueError):
        TargetSchedule("quadratic")


# ------------------------------------------------------------------------ regulariser


def _two_gates():
    model = torch.nn.ModuleDict({"a": AdaptiveDropout(2), "b": AdaptiveDropout(3)})
    with torch.no_grad():
        model["a"].logits.copy_(torch.tensor([1.0, 2.0]))
        model["b"].logits.copy_(torch.tensor([0.0, -1.0, 3.0]))
    model["a"].unit_cost, model["b"].unit_cost = 4.0, 1.0
    return model


def test_regulariser_value_mean_sum_and_cost_weighted():
    model = _two_gates()
    logits = torch.tensor([1.0, 2.0, 0.0, -1.0, 3.0])
    schedule = TargetSchedule("constant", end=0.5)
    squares = (logits - 0.5) ** 2
    mean = RetentionRegulariser(2.0, schedule)(model, 0.3)
    assert torch.isclose(mean, 2.0 * squares.mean())
    total = RetentionRegulariser(2.0, schedule, normalise="sum")(model, 0.3)
    assert torch.isclose(total, 2.0 * squares.sum())
    weights = torch.tensor([4.0, 4.0, 1.0, 1.0, 1.0])
    weighted = RetentionRegulariser(1.0, schedule, cost_weighted=True)(model, 0.3)
    assert torch.isclose(weighted, (squares * weights / weights.mean()).mean())
    weighted.backward()
    assert model["a"].logits.grad is not None


def test_regulariser_pulls_logits_toward_target():
    model = _two_gates()
    regulariser = RetentionRegulariser(1.0, TargetSchedule("linear", 3.0, -3.0))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(50):
        optimiser.zero_grad()
        regulariser(model, 1.0).backward()
        optimiser.step()
    assert regulariser.target == -3.0
    logits = torch.cat([g.logits for _, g in iter_gates(model)])
    assert torch.allclose(logits, torch.tensor(-3.0), atol=1e-3)


def test_commit_phase_pulls_each_unit_to_the_pole_on_its_side():
    gate = AdaptiveDropout(4)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([1.0, 0.5, -0.5, -1.0]))
    schedule = TargetSchedule("linear", 3.0, -3.0, span=0.5)
    regulariser = RetentionRegulariser(1.0, schedule, keep_target=4.0)
    # While the target falls, every unit has the same target.
    assert regulariser(gate, 0.25).item() == pytest.approx(
        sum((b - 0.0) ** 2 for b in (1.0, 0.5, -0.5, -1.0)) / 4)
    # Once it has fallen, kept units (p >= 0.5) are pulled to keep_target, the rest to c.
    expected = ((1.0 - 4.0) ** 2 + (0.5 - 4.0) ** 2 + (-0.5 + 3.0) ** 2 + (-1.0 + 3.0) ** 2) / 4
    assert regulariser(gate, 0.6).item() == pytest.approx(expected)
    optimiser = torch.optim.SGD(gate.parameters(), lr=0.5)
    for _ in range(50):
        optimiser.zero_grad()
        regulariser(gate, 1.0).backward()
        optimiser.step()
    assert torch.allclose(gate.logits, torch.tensor([4.0, 4.0, -3.0, -3.0]), atol=1e-3)


def test_budget_mode_moves_alpha_toward_target():
    model = _two_gates()
    model["w"] = torch.nn.Linear(10, 10)  # 110 dense parameters (gate logits do not count)
    schedule = TargetSchedule("constant", end=-3.0)
    above = RetentionRegulariser(1.0, schedule, target_params=50, budget_every=1)
    above(model, 0.5)
    assert above.alpha > 1.0  # nearly all units open: above budget, push harder
    below = RetentionRegulariser(1.0, schedule, target_params=100, budget_every=1)
    with torch.no_grad():
        for _, gate in iter_gates(model):
            gate.logits.fill_(-5.0)
    below(model, 0.5)
    assert below.alpha < 1.0


def test_budget_commit_keeps_the_most_retained_units_that_fit():
    model = _two_gates()  # a: 2 units of cost 4, b: 3 units of cost 1
    model["w"] = torch.nn.Linear(10, 10)  # 110 parameters: 99 ungated, as unit costs count
    schedule = TargetSchedule("linear", 3.0, -3.0, span=0.5)
    regulariser = RetentionRegulariser(1.0, schedule, target_params=99 + 9, keep_target=4.0,
                                       budget_every=1000)
    regulariser(model, 0.6)  # commit phase: the side of each unit is the budget's
    gates = [gate for _, gate in iter_gates(model)]
    # logits by rank: b2 (3.0, cost 1), a1 (2.0, cost 4), a0 (1.0, cost 4) -> 9 fits; b0 not.
    assert regulariser.budget_keep(gates).tolist() == [True, True, False, False, True]
    # b0 (p = 0.5) is above the threshold but outside the budget: pulled down, not up.
    targets = regulariser._unit_targets(gates, 0.6)
    assert targets.tolist() == [4.0, 4.0, -3.0, -3.0, 4.0]


def test_budget_commit_lands_on_the_budget_in_real_parameters():
    gated = insert_gates(tiny_modules())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, gate in iter_gates(gated):
            gate.logits.copy_(torch.randn(gate.units, generator=generator))
    dense = params_if_shrunk(insert_gates(tiny_modules()))["total"]
    target = int(0.4 * dense)
    regulariser = RetentionRegulariser(1.0, TargetSchedule("linear", span=0.5),
                                       target_params=target, keep_target=4.0)
    regulariser(gated, 0.6)
    gates = [gate for _, gate in iter_gates(gated)]
    kept = regulariser.budget_keep(gates)
    with torch.no_grad():  # as if the commit phase had polarised every unit to its side
        for gate, side in zip(gates, torch.split(kept, [g.units for g in gates])):
            gate.logits.copy_(torch.where(side, 4.0, -4.0))
    # By unit costs the kept side fills the budget to within one unit; the real shrink is never
    # larger (a conv module with no channel left sheds its norm and bias too: smaller).
    closed = sum(g.unit_cost * int((~g.keep_mask()).sum()) for g in gates)
    by_costs = dense - closed
    assert target - max(g.unit_cost for g in gates) < by_costs <= target
    assert params_if_shrunk(gated)["total"] <= by_costs


def test_a_budget_the_model_already_fits_is_a_clear_error():
    gated = insert_gates(tiny_modules())
    regulariser = RetentionRegulariser(1.0, TargetSchedule(), target_params=1850000)
    with pytest.raises(InputError, match="gate_target_params: 1850000 is not below"):
        regulariser(gated, 0.0)


def test_retention_distribution_counts_bins_and_polarised_share():
    model = torch.nn.Sequential(AdaptiveDropout(4), AdaptiveDropout(2))
    retentions = [0.01, 0.05, 0.35, 0.95, 0.999, 0.5]
    with torch.no_grad():
        model[0].logits.copy_(torch.tensor([logit(p) for p in retentions[:4]]))
        model[1].logits.copy_(torch.tensor([logit(p) for p in retentions[4:]]))
    spread = retention_distribution(model, bins=10, margin=0.1)
    assert spread["counts"] == [2, 0, 0, 1, 0, 1, 0, 0, 0, 2]
    assert spread["polarised_fraction"] == pytest.approx(4 / 6)
    assert retention_distribution(model, bins=2)["counts"] == [3, 3]
    with pytest.raises(ValueError, match="no AdaptiveDropout"):
        retention_distribution(torch.nn.Linear(2, 2))


def test_commit_phase_that_could_never_start_is_refused_at_start_up():
    late = TargetSchedule("linear", 3.0, -3.0, span=0.7, delay=0.4)
    with pytest.raises(ValueError, match=r"delay \+ span = 0.4 \+ 0.7 > 1.*gate_target_delay"):
        RetentionRegulariser(1.0, late, keep_target=4.0)
    RetentionRegulariser(1.0, late)  # without a commit phase the late fall is allowed
    RetentionRegulariser(1.0, TargetSchedule("linear", span=0.6, delay=0.4), keep_target=4.0)


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential", "step", "constant"])
def test_commit_phase_starts_when_the_fall_ends_for_every_shape(shape):
    """delay 0.2 + span 0.5: one target for all units before 0.7, split by side from 0.7 on,
    the step and constant shapes included (they used to commit from their first step)."""
    gate = AdaptiveDropout(2)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([2.0, -2.0]))  # one kept, one closed
    schedule = TargetSchedule(shape, 3.0, -3.0, span=0.5, delay=0.2)
    regulariser = RetentionRegulariser(1.0, schedule, keep_target=5.0)
    for progress in (0.0, 0.3, 0.69):
        c = schedule.c(progress)
        assert regulariser(gate, progress).item() == pytest.approx(
            ((2.0 - c) ** 2 + (-2.0 - c) ** 2) / 2), progress
    for progress in (0.7, 1.0):
        assert regulariser(gate, progress).item() == pytest.approx(
            ((2.0 - 5.0) ** 2 + (-2.0 + 3.0) ** 2) / 2), progress
    assert schedule.fall_ends == pytest.approx(0.7)


@pytest.mark.parametrize("make, key", [
    (lambda: TargetSchedule("linear", span=0.0), "gate_target_span"),
    (lambda: TargetSchedule("linear", delay=-0.1), "gate_target_delay"),
    (lambda: TargetSchedule("linear", delay=1.0), "gate_target_delay"),
    (lambda: TargetSchedule("linear", start=math.inf), "gate_target_start"),
    (lambda: TargetSchedule("linear", end=math.nan), "gate_target_end"),
    (lambda: TargetSchedule("zigzag"), "shape"),
    (lambda: TargetSchedule("exponential", rate=0.0), "rate"),
    (lambda: RetentionRegulariser(0.0, TargetSchedule()), "gate_alpha"),
    (lambda: RetentionRegulariser(1.0, TargetSchedule(), target_params=0), "gate_target_params"),
    (lambda: RetentionRegulariser(1.0, TargetSchedule(), budget_every=0), "gate_budget_every"),
    (lambda: RetentionRegulariser(1.0, TargetSchedule("step", span=0.9, delay=0.2),
                                  keep_target=4.0), "gate_target_delay"),
    (lambda: AdaptiveDropout(4, init_retention=1.0), "gate_init_retention"),
    (lambda: AdaptiveDropout(4, temperature=0.0), "gate_temperature"),
    (lambda: AdaptiveDropout(4, threshold=1.0), "gate_threshold"),
])
def test_bad_gate_settings_are_start_up_errors_naming_the_yaml_key(make, key):
    with pytest.raises(ValueError, match=key):
        make()


def test_conv_gate_scales_a_channel_once_in_training():
    """A relaxed mask m scales the channels entering the depthwise conv by m, and nothing else:
    the gated module equals SpeechBrain's module with the GLU output times m (not m * m)."""
    torch.manual_seed(0)
    dense = build_asr_modules(**TINY_ARCH)
    conv = dense["Transformer"].encoder.layers[0].convolution_module
    reference = copy.deepcopy(conv).eval()
    gated = insert_gates(dense, sites=("conv",))
    module = gated["Transformer"].encoder.layers[0].convolution_module
    module.eval()  # no dropout; the mask is set by hand below
    channels = module.conv.in_channels
    m = torch.linspace(0.1, 0.9, channels).unsqueeze(0)
    module.gate.mask = lambda batch_size: m.expand(batch_size, channels)
    x = torch.randn(2, 7, TINY_ARCH["d_model"])

    reference.conv.register_forward_pre_hook(
        lambda _, inputs: (inputs[0] * m.view(1, channels, 1),))
    expected = reference(x)
    assert torch.allclose(module(x), expected, atol=1e-6)


def test_regulariser_needs_gates():
    with pytest.raises(ValueError):
        RetentionRegulariser(1.0, TargetSchedule())(torch.nn.Linear(2, 2), 0.0)


# ------------------------------------------------------------------------ insert_gates


def test_insert_gates_all_open_is_the_dense_model():
    dense = tiny_modules().eval()
    gated = insert_gates(copy.deepcopy(dense)).eval()
    feats, lens = torch.randn(3, 40, TINY_ARCH["n_mels"]), torch.tensor([1.0, 0.8, 0.5])
    with torch.no_grad():
        assert torch.allclose(encode(dense, feats, lens), encode(gated, feats, lens), atol=1e-6)
    keys = [k for k in gated.state_dict() if k not in dense.state_dict()]
    assert keys and all(k.endswith("gate.logits") for k in keys)
    counts = count_params(gated.state_dict())
    d_model, d_ffn, layers = TINY_ARCH["d_model"], TINY_ARCH["d_ffn"], TINY_ARCH["num_encoder_layers"]
    assert counts["gate_logits"] == layers * (2 * d_ffn + 3 * d_model)
    dense_counts = count_params(param_state(dense))
    assert params_if_shrunk(gated) == {k: dense_counts[k] for k in ("total", "encoder",
                                                                     "decoder", "ctc")}


@pytest.mark.parametrize("sites", [("ffn",), ("query",), ("value",), ("conv",), ("query", "conv")])
def test_switched_off_sites_add_nothing(sites):
    gated = insert_gates(tiny_modules(), sites=sites)
    names = {row["site"] for row in gate_summary(gated)}
    expected = set(sites) - {"ffn"} | ({"ffn1", "ffn2"} if "ffn" in sites else set())
    assert names == expected
    assert len(list(iter_gates(gated))) == TINY_ARCH["num_encoder_layers"] * len(expected)


def test_insert_gates_on_transformer_and_unknown_site():
    transformer = tiny_modules()["Transformer"]
    assert insert_gates(transformer, sites=["conv"]) is transformer
    assert len(list(iter_gates(transformer))) == TINY_ARCH["num_encoder_layers"]
    with pytest.raises(ValueError):
        insert_gates(tiny_modules(), sites=("ffn", "heads"))
    with pytest.raises(ValueError, match="already gated"):
        insert_gates(transformer, sites=["conv"])


def test_training_step_reaches_every_gate():
    gated = insert_gates(tiny_modules(), temperature=0.5).train()
    feats, lens = torch.randn(2, 30, TINY_ARCH["n_mels"]), torch.tensor([1.0, 0.6])
    encode(gated, feats, lens).pow(2).mean().backward()
    for name, gate in iter_gates(gated):
        assert gate.logits.grad is not None and gate.logits.grad.abs().sum() > 0, name


def test_unit_costs_reported_by_gated_modules():
    gated = insert_gates(tiny_modules())
    d, k = TINY_ARCH["d_model"], TINY_ARCH["kernel_size"]
    layer = gated["Transformer"].encoder.layers[0]
    assert layer.ffn_module1[1].gate.unit_cost == 2 * d + 1
    assert layer.mha_layer.query_gate.unit_cost == 3 * d + 2
    assert layer.mha_layer.value_gate.unit_cost == 2 * d
    assert layer.convolution_module.gate.unit_cost == 3 * d + k + 4


def test_gate_summary_counts_and_threshold_override():
    gated = insert_gates(tiny_modules(), sites=("ffn",))
    with torch.no_grad():
        gate = gated["Transformer"].encoder.layers[1].ffn_module2[1].gate
        gate.logits[:5] = -1.0
    row = next(r for r in gate_summary(gated) if r["layer"] == 1 and r["site"] == "ffn2")
    assert row["units"] == TINY_ARCH["d_ffn"] and row["kept"] == TINY_ARCH["d_ffn"] - 5
    assert row["below_threshold"] == 5
    assert row["mean_retention"] == pytest.approx(float(gate.retention().detach().mean()))
    set_threshold(gated, 0.99)
    assert all(r["kept"] == 0 for r in gate_summary(gated))


def test_insert_gates_from_hyperpyyaml():
    yaml = """
arch:
    vocab_size: 12
    n_mels: 16
    d_model: 16
    nhead: 2
    num_encoder_layers: 1
    num_decoder_layers: 1
    d_ffn: 24
    kernel_size: 3
    cnn_channels: [4, 4]
asr_modules: !apply:conformer_prune.gated_conformer.insert_gates
    modules_or_transformer: !apply:conformer_prune.model.build_from_arch [!ref <arch>]
    sites: [ffn, conv]
    init_retention: 0.9
"""
    hparams = load_hyperpyyaml(yaml)
    gates = list(iter_gates(hparams["asr_modules"]))
    assert len(gates) == 3
    assert all(abs(float(g.retention().detach()[0]) - 0.9) < 1e-6 for _, g in gates)


# ------------------------------------------------------------------------ start on learning


def adrop_method(**start):
    schedule = TargetSchedule("linear", 3.0, -4.0, span=0.45, delay=0.15)
    regulariser = RetentionRegulariser(1.0, schedule, keep_target=6.0)
    method = AdaptiveDropoutMethod(regulariser, torch.optim.Adam, **start)
    method.modules = method.attach({"asr": tiny_modules()})
    return method


def test_a_quiet_gate_passes_every_unit_in_training_only():
    gate = AdaptiveDropout(6, init_retention=0.6).train()
    gate.quiet = True
    assert torch.equal(gate(torch.full((2, 3, 6), 2.0)), torch.full((2, 3, 6), 2.0))
    gate.logits.data[:2] = -5.0
    assert gate.eval().keep_mask().sum() == 4  # evaluation keeps its threshold rule


def test_without_start_on_learning_the_clock_is_the_step_count():
    method = adrop_method()
    assert [method.schedule_progress(p) for p in (0.1, 0.5, 0.9)] == [0.1, 0.5, 0.9]
    method.after_validation(None, 0.25, {"cer": 1.0, "wer": 1.0})
    assert method.fall_start is None and not method.quiet


def test_start_on_learning_holds_the_target_until_the_dev_cer_says_so():
    method = adrop_method(start_below_cer=60, quiet_before_start=True)
    gates = method._gates
    assert method.quiet and all(g.quiet for g in gates)
    assert method.schedule_progress(0.3) == 0.15  # held at the schedule's delay
    method.after_validation(None, 0.25, {"cer": 70.0, "wer": 99.0})
    assert method.fall_start is None and all(g.quiet for g in gates)
    method.after_validation(None, 0.375, {"cer": 59.0, "wer": 90.0})
    assert method.fall_start == 0.375 and not any(g.quiet for g in gates)
    assert method.schedule_progress(0.375) == pytest.approx(0.15)
    assert method.schedule_progress(1.0) == pytest.approx(1.0)  # the end is the end of training
    # the fall (0.45 of the schedule) now takes 0.45 * 0.625 / 0.85 of training
    ends = 0.375 + 0.45 * 0.625 / 0.85
    assert method.schedule_progress(ends) == pytest.approx(0.6)
    assert method.regulariser.schedule.fall_ended(method.schedule_progress(ends + 1e-6))


def test_start_on_learning_starts_at_start_latest_when_the_model_never_learns():
    method = adrop_method(start_below_cer=60, start_latest=0.5, quiet_before_start=True)
    method.after_validation(None, 0.375, {"cer": 80.0, "wer": 100.0})
    assert method.schedule_progress(0.49) == 0.15 and method.quiet
    method.penalty(method.modules, 0.5)
    assert not method.quiet
    assert method.schedule_progress(0.75) == pytest.approx(0.15 + 0.25 * 0.85 / 0.5)
    method.after_validation(None, 0.625, {"cer": 10.0, "wer": 20.0})
    assert method.fall_start is None  # too late to count: the clock started at start_latest


def test_start_on_learning_resumes_where_it_was():
    method = adrop_method(start_below_cer=60, quiet_before_start=True)
    method.after_validation(None, 0.25, {"cer": 50.0, "wer": 80.0})
    resumed = adrop_method(start_below_cer=60, quiet_before_start=True)
    resumed.load_state_dict(method.state_dict())
    assert resumed.fall_start == 0.25 and not any(g.quiet for g in resumed._gates)
    assert resumed.schedule_progress(0.6) == method.schedule_progress(0.6)
    old_checkpoint = {"alpha": 1.0, "calls": 3}  # written before start on learning existed
    resumed.load_state_dict(old_checkpoint)
    assert resumed.fall_start is None


@pytest.mark.parametrize("bad, key", [
    (dict(start_below_cer=0), "gate_start_below_cer"),
    (dict(start_below_cer=60, start_latest=0.1), "gate_start_latest"),
    (dict(quiet_before_start=True), "gate_quiet_before_start"),
])
def test_start_on_learning_settings_are_checked(bad, key):
    with pytest.raises(InputError, match=key):
        adrop_method(**bad)
