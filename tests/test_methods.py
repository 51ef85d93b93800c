"""The method seam: keep masks from any method shrink exactly, the site registry's costs match
what the shrink removes, the baselines hit their sizes, and a new method plugs in alone."""

import copy
import json

import pytest
import speechbrain as sb
import torch

from conformer_prune.asr_brain import ASRBrain
from conformer_prune.gated_conformer import masked_model
from conformer_prune.methods import PruningMethod
from conformer_prune.methods.from_scratch import CompactFromScratch, uniform_keep
from conformer_prune.methods.structured_magnitude import (
    StructuredMagnitude,
    encoder_params_of,
    keep_global,
    keep_widths_of,
)
from conformer_prune.errors import InputError
from conformer_prune.model import build_asr_modules, count_params, param_state
from conformer_prune.shrink import apply_widths, save_compact, shrink_modules
from conformer_prune.sites import (
    SITES,
    encoder_layers,
    params_removed_by,
    site_shape,
    unit_cost,
    widths_of,
)
from test_recipe import fake_batch, load_yaml
from test_shrink import ARCH, assert_same_outputs

# ----------------------------------------------------------------------------- registry


def random_keep(model, seed=0, keep_probability=0.6):
    generator = torch.Generator().manual_seed(seed)
    return {(i, site): torch.rand(site_shape(layer, site), generator=generator) < keep_probability
            for i, layer in enumerate(encoder_layers(model)) for site in SITES}


def encoder_count(model):
    return count_params(param_state(model))["encoder"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_keep_masks_shrink_exactly_to_the_masked_model(seed):
    torch.manual_seed(seed)
    dense = build_asr_modules(**ARCH).eval()
    keep = random_keep(dense, seed)
    masked = masked_model(copy.deepcopy(dense), keep).eval()
    compact = copy.deepcopy(dense)
    widths = shrink_modules(compact, keep)
    assert_same_outputs(masked, compact.eval(), seed=seed + 1)
    assert widths == widths_of(keep, dense)


@pytest.mark.parametrize("site", SITES)
def test_unit_cost_is_what_the_shrink_removes(site):
    dense = build_asr_modules(**ARCH)
    layer = encoder_layers(dense)[0]
    mask = torch.ones(site_shape(layer, site), dtype=torch.bool)
    mask.view(-1)[0] = False  # one unit, never a whole head or module
    compact = copy.deepcopy(dense)
    shrink_modules(compact, {(0, site): mask})
    assert encoder_count(dense) - encoder_count(compact) == unit_cost(layer, site)
    assert params_removed_by(dense, {(0, site): mask}) == unit_cost(layer, site)


@pytest.mark.parametrize("seed", [0, 3])
def test_params_removed_by_counts_emptied_heads_and_modules(seed):
    dense = build_asr_modules(**ARCH)
    keep = random_keep(dense, seed, keep_probability=0.3)
    keep[(0, "conv")][:] = False
    keep[(1, "value")][0] = False  # head 0 of layer 1 loses its values, so its queries go too
    compact = copy.deepcopy(dense)
    shrink_modules(compact, keep)
    assert params_removed_by(dense, keep) == encoder_count(dense) - encoder_count(compact)


def test_keep_masks_that_do_not_fit_are_refused():
    dense = build_asr_modules(**ARCH)
    with pytest.raises(ValueError, match=r"keep mask \(0, ffn1\): expected a bool tensor of "
                                         r"shape \(24,\)"):
        shrink_modules(dense, {(0, "ffn1"): torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown site 'ffn'"):
        shrink_modules(dense, {(0, "ffn"): torch.ones(24, dtype=torch.bool)})


# ------------------------------------------------------------------- magnitude baselines


def test_magnitude_widths_match_the_given_widths_and_keep_the_strongest_units():
    torch.manual_seed(0)
    dense = build_asr_modules(**ARCH)
    target = widths_of(random_keep(dense, 5), dense)
    keep = keep_widths_of(dense, target)
    assert widths_of(keep, dense) == target
    # The kept FFN units of layer 0 are the ones with the largest norms.
    linear1, linear2 = encoder_layers(dense)[0].ffn_module1[1].ffn[0], \
        encoder_layers(dense)[0].ffn_module1[1].ffn[3]
    norms = (linear1.weight.pow(2).sum(1) + linear1.bias.pow(2)
             + linear2.weight.pow(2).sum(0)).sqrt()
    kept = keep[(0, "ffn1")]
    if kept.any() and (~kept).any():
        assert norms[kept].min() >= norms[~kept].max()


def test_magnitude_global_reaches_the_parameter_target_within_2_percent():
    torch.manual_seed(0)
    dense = build_asr_modules(**ARCH)
    target = int(encoder_count(dense) * 0.45)
    keep = keep_global(dense, target)
    compact = copy.deepcopy(dense)
    shrink_modules(compact, keep)
    got = encoder_count(compact)
    assert got <= target and got >= 0.98 * target


def test_uniform_keep_scales_every_site_alike():
    dense = build_asr_modules(**ARCH)
    widths = widths_of(uniform_keep(dense, 0.5), dense)["layers"][0]
    assert widths["ffn1"] == widths["ffn2"] == 12
    assert widths["attention"] == {"query": [2, 2, 2, 2], "value": [2, 2, 2, 2]}
    assert widths["conv"] == 8


def shrunk_arch_file(tmp_path, seed=7):
    """An arch.json as `conformer-prune shrink` writes it, from random masks."""
    torch.manual_seed(seed)
    model = build_asr_modules(**ARCH)
    widths = shrink_modules(model, random_keep(model, seed, keep_probability=0.5))
    save_compact(tmp_path / "compact", model, ARCH, widths)
    return tmp_path / "compact"


def test_from_scratch_methods_build_the_sizes_they_promise(tmp_path):
    compact_dir = shrunk_arch_file(tmp_path)
    target = encoder_params_of(compact_dir)
    saved = json.loads((compact_dir / "arch.json").read_text())

    exact = {"asr": build_asr_modules(**ARCH)}
    CompactFromScratch(widths_from=str(compact_dir)).attach(exact)
    assert encoder_count(exact["asr"]) == target
    assert widths_of_model(exact["asr"]) == saved["widths"]

    uniform = {"asr": build_asr_modules(**ARCH)}
    method = CompactFromScratch(uniform_params_from=str(compact_dir))
    method.attach(uniform)
    assert 0.9 * target <= encoder_count(uniform["asr"]) <= target
    assert 0 < method.fraction < 1


def widths_of_model(model):
    """The widths a compact model was built with, read back from its modules."""
    layers = []
    for layer in encoder_layers(model):
        mha = layer.mha_layer
        layers.append({"ffn1": layer.ffn_module1[1].ffn[0].out_features,
                       "ffn2": layer.ffn_module2[1].ffn[0].out_features,
                       "attention": {"query": mha.query_widths, "value": mha.value_widths},
                       "conv": layer.convolution_module.channels})
    return {"layers": layers}


def test_compact_attention_from_scratch_is_initialised_to_learn():
    """Zero query/key weights would give queries and keys no gradient, ever."""
    model = build_asr_modules(**ARCH)
    apply_widths(model, widths_of(uniform_keep(model, 0.5), model))
    mha = encoder_layers(model)[0].mha_layer
    assert mha.in_proj_weight.abs().mean() > 0.05
    assert mha.pos_bias_u.abs().mean() > 0.05


def test_structured_magnitude_prunes_a_dense_run_and_loads_its_normaliser(tmp_path):
    from speechbrain.processing.features import InputNormalization
    from speechbrain.utils.checkpoints import Checkpointer

    torch.manual_seed(3)
    dense = build_asr_modules(**ARCH)
    normalizer = InputNormalization(norm_type="global")
    normalizer(torch.randn(2, 30, 16) * 2 + 5, torch.ones(2))
    run_dir = tmp_path / "dense" / "1986"
    Checkpointer(run_dir / "save", {"model": dense, "normalizer": normalizer}).save_checkpoint()
    compact_dir = shrunk_arch_file(tmp_path)

    fresh = {"asr": build_asr_modules(**ARCH), "normalize": InputNormalization()}
    method = StructuredMagnitude(dense_run=str(run_dir), widths_from=str(compact_dir))
    method.attach(fresh)
    assert torch.equal(fresh["normalize"].glob_mean, normalizer.glob_mean)
    expected = copy.deepcopy(dense)
    shrink_modules(expected, keep_widths_of(dense, method.widths))
    got = fresh["asr"].state_dict()
    assert all(torch.equal(t, got[k]) for k, t in expected.state_dict().items())
    assert encoder_count(fresh["asr"]) == encoder_params_of(compact_dir)

    # Bad input names the item (docs/RELIABILITY.md).
    with pytest.raises(InputError, match="no checkpoint under save/"):
        StructuredMagnitude(dense_run=str(tmp_path / "none"), widths_from="x").attach(fresh)
    with pytest.raises(InputError, match="exactly one of"):
        StructuredMagnitude(dense_run=str(run_dir))
    with pytest.raises(InputError, match=r"/x: missing; expected the arch.json"):
        StructuredMagnitude(dense_run=str(run_dir), widths_from=str(tmp_path / "x")).attach(
            {"asr": build_asr_modules(**ARCH), "normalize": InputNormalization()})
    (tmp_path / "broken.json").write_text("{arch:")
    with pytest.raises(InputError, match=r"broken.json: not valid JSON"):
        StructuredMagnitude(dense_run=str(run_dir), widths_from=str(tmp_path / "broken.json")
                            ).attach({"asr": build_asr_modules(**ARCH),
                                      "normalize": InputNormalization()})
    wider = build_asr_modules(**{**ARCH, "d_ffn": ARCH["d_ffn"] * 2})
    with pytest.raises(InputError, match=r"model.ckpt: the dense run's model does not fit"):
        StructuredMagnitude(dense_run=str(run_dir), widths_from=str(compact_dir)).attach(
            {"asr": wider, "normalize": InputNormalization()})


# --------------------------------------------------------------------- a new method plugs in


class HalveFFN1(PruningMethod):
    """A trivial method written here, touching no other file: an L1 pull on the first FFN's
    hidden weights, a counter after each step, and keep masks for the shrink."""

    name = "halve_ffn1"
    kind = "structured"

    def __init__(self):
        self.steps = 0

    def penalty(self, modules, progress):
        return 1e-3 * sum(layer.ffn_module1[1].ffn[0].weight.abs().sum()
                          for layer in encoder_layers(modules["asr"]))

    def after_step(self, modules, progress):
        self.steps += 1

    def keep_masks(self, modules):
        keep = {}
        for i, layer in enumerate(encoder_layers(modules["asr"])):
            width = layer.ffn_module1[1].ffn[0].out_features
            keep[(i, "ffn1")] = torch.arange(width) < width // 2
        return keep

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_a_method_defined_in_a_test_trains_and_shrinks_through_the_seam(tmp_path):
    hparams = load_yaml("mini/conformer_dense.yaml", tmp_path)
    method = hparams["method"] = HalveFFN1()
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams,
                     checkpointer=hparams["checkpointer"])
    brain.total_train_steps = 10
    brain.init_optimizers()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    batch = fake_batch(hparams["output_neurons"], hparams["bos_index"], hparams["eos_index"])
    brain.fit_batch(batch)
    assert method.steps == 1
    assert brain.regulariser_batches == 1 and brain.regulariser_sum > 0
    brain.checkpointer.add_recoverable("method", method)
    brain.checkpointer.save_checkpoint()
    method.steps = 99
    brain.checkpointer.recover_if_possible()
    assert method.steps == 1
    asr = hparams["modules"]["asr"]
    keep = method.keep_masks(hparams["modules"])
    before, expected_removed = encoder_count(asr), params_removed_by(asr, keep)
    widths = shrink_modules(asr, keep)
    assert widths["layers"][0]["ffn1"] == 288
    assert before - encoder_count(asr) == expected_removed
