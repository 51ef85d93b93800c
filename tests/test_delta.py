"""Delta-parameter pruning (DARE, DAREx-q, magnitude) and AdamR, on small tensors."""

import math

import pytest
import torch

from conformer_prune.delta import delta_of, load_delta, prune_delta, rebuild, save_delta
from conformer_prune.errors import InputError
from conformer_prune.optim import AdamR


def _pair(seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(40, 50, generator=generator), "b": torch.randn(30, generator=generator),
            "steps": torch.tensor(3)}
    finetuned = {k: (v + 0.1 * torch.randn(v.shape, generator=generator)
                     if v.is_floating_point() else v) for k, v in base.items()}
    return base, finetuned


def test_dare_keeps_the_expected_value_of_each_delta_entry():
    d = {"w": torch.full((200_000,), 0.3)}
    pruned = prune_delta(d, "dare", drop=0.9, seed=1)["w"]
    kept = pruned != 0
    assert torch.allclose(pruned[kept], torch.tensor(3.0))  # 0.3 / (1 - 0.9)
    assert abs(kept.float().mean().item() - 0.1) < 0.005
    assert abs(pruned.mean().item() - 0.3) < 0.01  # E[D'] = D


def test_darex_with_q_one_minus_p_is_dare_exactly():
    base, finetuned = _pair()
    delta = delta_of(base, finetuned)
    dare = prune_delta(delta, "dare", drop=0.7, seed=5)
    darex = prune_delta(delta, "darex_q", drop=0.7, q=1 - 0.7, seed=5)
    assert all(torch.equal(dare[k], darex[k]) for k in dare)
    other = prune_delta(delta, "darex_q", drop=0.7, q=0.5, seed=5)
    kept = dare["a"] != 0
    assert torch.allclose(other["a"][kept], dare["a"][kept] * 0.3 / 0.5)


def test_drop_rate_zero_rebuilds_the_fine_tuned_model_bit_for_bit(tmp_path):
    base, finetuned = _pair()
    for method in ("dare", "darex_q", "magnitude"):
        pruned = prune_delta(delta_of(base, finetuned), method, drop=0.0, seed=3)
        save_delta(tmp_path / method, pruned, {"method": method})
        rebuilt = rebuild(base, load_delta(tmp_path / method))
        assert all(torch.equal(rebuilt[k], finetuned[k]) for k in finetuned), method


def test_magnitude_keeps_the_largest_deltas_per_tensor_unscaled():
    d = {"w": torch.tensor([0.5, -3.0, 0.1, 2.0]), "v": torch.tensor([1.0, -1.5])}
    pruned = prune_delta(d, "magnitude", drop=0.5)
    assert pruned["w"].tolist() == [0.0, -3.0, 0.0, 2.0]
    assert pruned["v"].tolist() == [0.0, -1.5]


def test_the_seed_fixes_the_masks_and_the_file_records_it(tmp_path):
    base, finetuned = _pair()
    delta = delta_of(base, finetuned)
    first = prune_delta(delta, "dare", drop=0.9, seed=11)
    assert all(torch.equal(first[k], prune_delta(delta, "dare", drop=0.9, seed=11)[k])
               for k in first)
    assert not torch.equal(first["a"], prune_delta(delta, "dare", drop=0.9, seed=12)["a"])
    info = save_delta(tmp_path, first, {"method": "dare", "drop": 0.9, "seed": 11})
    assert info["seed"] == 11 and 0 < info["delta_nonzero"] < info["delta_entries"]
    # 10% kept of a large tensor: 1 bit per entry and 4 bytes per kept value, about 1/7 of dense.
    big = {"w": torch.randn(500, 400)}
    info = save_delta(tmp_path / "big", prune_delta(big, "dare", drop=0.9, seed=1), {})
    assert info["bytes"] < big["w"].numel() * 4 / 5


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "dare", "drop": 1.0}, "drop rate"),
    ({"method": "random", "drop": 0.5}, "delta method"),
    ({"method": "darex_q", "drop": 0.5, "q": 0.0}, "q 0.0"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        prune_delta({"w": torch.ones(3)}, **kwargs)


def test_a_variant_of_another_model_is_refused():
    base, finetuned = _pair()
    finetuned["a"] = torch.zeros(41, 50)
    with pytest.raises(InputError, match="'a'"):
        delta_of(base, finetuned)


# ----- AdamR --------------------------------------------------------------------------------


def _train(optimizer_class, steps=4, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    optimizer = optimizer_class(model.parameters(), lr=0.1, **kwargs)
    inputs = torch.randn(6, 5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(inputs).pow(2).sum().backward()
        optimizer.step()
    return model


def test_adamr_with_pull_zero_is_adam_exactly():
    adam, adamr = _train(torch.optim.Adam), _train(AdamR, pull=0.0)
    assert all(torch.equal(a, b) for a, b in zip(adam.parameters(), adamr.parameters()))


def test_adamr_pulls_toward_the_base_by_hand():
    """One weight w = 2 from base 1 (moved by hand), gradient 0: Adam does nothing, and the pull
    with lr 0.1, pull 0.5 and s = 1 (no second moment yet) moves w by 0.5 * 0.1 * (2 - 1)."""
    w = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = AdamR([w], lr=0.1, pull=0.5)
    with torch.no_grad():
        w.fill_(2.0)
    w.grad = torch.zeros(1)
    optimizer.step()
    assert w.item() == pytest.approx(2.0 - 0.05)


def test_adamr_keeps_the_delta_smaller_than_adam():
    torch.manual_seed(0)
    start = torch.nn.Linear(5, 3).state_dict()
    adam, adamr = _train(torch.optim.Adam, steps=20), _train(AdamR, steps=20, pull=5.0)
    moved = [sum(float((p.detach() - start[n]).norm()) for n, p in m.named_parameters())
             for m in (adam, adamr)]
    assert moved[1] < moved[0]


def test_analytic_q_matches_the_hand_computed_minimum():
    """For a row with sum c = S > 0 the objective's minimum is where its derivative vanishes:
    eta S (1-p) / q^2 = eta^2 phi(p) sum(c^2) / (2 q^3), i.e. q* = eta phi(p) sum(c^2) / (2 (1-p) S).
    One entry c = 0.3, p = 0.9, eta = 1: phi(0.9) = -0.8 / ln(1/9) = 0.364096, q* = 0.546144."""
    from conformer_prune.delta import analytic_q, phi

    assert phi(0.9) == pytest.approx(0.8 / math.log(9), rel=1e-12)
    assert phi(0.5) == 0.5
    q = analytic_q(torch.tensor([[0.3]]), drop=0.9, eta=1.0)
    assert q.item() == pytest.approx(0.546, abs=1e-9)  # q* on the 0.001 grid


def test_layer_q_of_a_tiny_linear_layer_by_hand():
    """A 2x2 linear layer, mean input [1.0, 0.5], weight delta rows [0.2, 0.4] and [0.1, 0.2],
    bias delta [0.1, 0.05]: c rows [0.2, 0.2, 0.1] and [0.1, 0.1, 0.05] (the bias as a column
    with input 1). At p = 0.9, eta = 1: q* = phi sum(c^2) / (2 (1-p) sum c) = 0.327686 and
    0.163843, so the grid gives 0.328 and 0.164 and the layer's q is their mean 0.246, for the
    weight and its bias; the other tensor (no measured input) gets the mean of layer qs."""
    from conformer_prune.delta import layer_qs

    delta = {"lin.weight": torch.tensor([[0.2, 0.4], [0.1, 0.2]]),
             "lin.bias": torch.tensor([0.1, 0.05]), "norm.weight": torch.tensor([0.3, 0.3])}
    qs = layer_qs(delta, {"lin": torch.tensor([1.0, 0.5])}, drop=0.9, eta=1.0)
    assert qs["lin.weight"] == pytest.approx(0.246, abs=1e-9)
    assert qs["lin.bias"] == qs["lin.weight"] == qs["norm.weight"]


def test_per_tensor_q_rescales_each_tensor_with_the_dare_masks():
    base, finetuned = _pair()
    delta = delta_of(base, finetuned)
    dare = prune_delta(delta, "dare", drop=0.8, seed=2)
    darex = prune_delta(delta, "darex_q", drop=0.8, q={"a": 0.4, "b": 0.25}, seed=2)
    for key, q in (("a", 0.4), ("b", 0.25)):
        kept = dare[key] != 0
        assert torch.equal(darex[key] != 0, kept)
        assert torch.allclose(darex[key][kept], dare[key][kept] * 0.2 / q)
    with pytest.raises(InputError, match="not for"):
        prune_delta(delta, "darex_q", drop=0.8, q={"a": 0.4}, seed=2)


def test_a_random_mask_delta_is_stored_without_its_masks_and_rebuilds_exactly(tmp_path):
    """DARE's masks come back from the seed: the seeded file holds the kept values alone
    (4 bytes each, no bitmask), rebuilds the same delta, and refuses masks drawn otherwise."""
    from conformer_prune.delta import SEEDED_FORMAT

    big = {"w": torch.randn(500, 400), "b": torch.randn(400)}
    pruned = prune_delta(big, "dare", drop=0.9, seed=4)
    seeded = save_delta(tmp_path / "seeded", pruned, {}, masks_from=(0.9, 4))
    bitmask = save_delta(tmp_path / "bitmask", pruned, {})
    assert seeded["storage"] == SEEDED_FORMAT and bitmask["storage"] == "bitmask"
    kept = sum(int(torch.count_nonzero(d)) for d in pruned.values())
    assert kept * 4 < seeded["bytes"] < kept * 4 + 4000  # values and a small header
    assert seeded["bytes"] < bitmask["bytes"] - 200_400 / 8 * 0.9  # no bitmask
    for folder in ("seeded", "bitmask"):
        loaded = load_delta(tmp_path / folder)
        assert all(torch.equal(loaded[k], pruned[k]) for k in pruned), folder

    stored = torch.load(tmp_path / "seeded" / "delta.ckpt")
    stored["seed"] = 5  # as if this machine's generator drew other masks
    torch.save(stored, tmp_path / "seeded" / "delta.ckpt")
    with pytest.raises(InputError, match="draws other masks"):
        load_delta(tmp_path / "seeded")
