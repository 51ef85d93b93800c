"""The recipe's YAMLs build what they promise, and one training step runs through the Brain."""

import math
from pathlib import Path

import pytest
import sentencepiece
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.batch import PaddedBatch

from conformer_prune.asr_brain import (
    ASRBrain,
    attach_method,
    init_progress_clock,
    load_tokenizer,
    train_tokenizer,
)
from conformer_prune.gates import iter_gates
from conformer_prune.model import build_asr_modules

ROOT = Path(__file__).resolve().parent.parent


def load_yaml(name, tmp_path, **overrides):
    overrides = {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "run"), **overrides}
    with open(ROOT / "hparams" / name, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    attach_method(hparams)  # as train.py does before building the Brain
    return hparams


def fake_batch(vocab_size, bos_index, eos_index, seconds=(1.6, 1.0)):
    generator = torch.Generator().manual_seed(0)
    examples = []
    for index, duration in enumerate(seconds):
        tokens = torch.randint(3, vocab_size, (5,), generator=generator)
        examples.append(
            {
                "id": f"utt{index}",
                "sig": 0.1 * torch.randn(int(16000 * duration), generator=generator),
                "wrd": "HELLO WORLD",
                "tokens_bos": torch.cat([torch.tensor([bos_index]), tokens]),
                "tokens_eos": torch.cat([tokens, torch.tensor([eos_index])]),
                "tokens": tokens,
                "duration": duration,
            }
        )
    return PaddedBatch(examples)


def one_training_step(hparams):
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams)
    brain.total_train_steps = 100
    brain.init_optimizers()
    batch = fake_batch(hparams["output_neurons"], hparams["bos_index"], hparams["eos_index"])
    brain.modules.train()
    brain.on_stage_start(sb.Stage.TRAIN, 1)
    outputs = brain.compute_forward(batch, sb.Stage.TRAIN)
    loss = brain.compute_objectives(outputs, batch, sb.Stage.TRAIN)
    loss.backward()
    return brain, loss


@pytest.mark.parametrize("name", ["conformer_dense.yaml", "conformer_adrop.yaml"])
def test_librispeech_yaml_has_conformer_small_dimensions_and_trains_one_step(name, tmp_path):
    hparams = load_yaml(name, tmp_path)
    transformer = hparams["asr_modules"].Transformer
    assert len(transformer.encoder.layers) == 12
    assert len(transformer.decoder.layers) == 4
    layer = transformer.encoder.layers[0]
    assert layer.mha_layer.num_heads == 4 and layer.mha_layer.embed_dim == 144
    assert layer.ffn_module1[1].ffn[0].out_features == 1024
    assert hparams["output_neurons"] == 5000

    brain, loss = one_training_step(hparams)
    assert math.isfinite(loss.item())
    missing = [n for n, p in brain.modules.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    gates = list(iter_gates(brain.modules.asr))
    if name == "conformer_adrop.yaml":
        # 12 layers x (2 FFNs + query + value + conv); every logit receives a gradient
        assert len(gates) == 12 * 5
        assert all(g.logits.grad.abs().sum() > 0 for _, g in gates)
    else:
        assert gates == []


def test_gate_logits_get_their_own_optimizer(tmp_path):
    hparams = load_yaml("mini/conformer_adrop.yaml", tmp_path)
    brain, _ = one_training_step(hparams)
    gate_ids = {id(g.logits) for _, g in iter_gates(brain.modules.asr)}
    model_ids = {id(p) for group in brain.optimizer.param_groups for p in group["params"]}
    gate_optimizer = brain.optimizers_dict["gate_optimizer"]
    gate_opt_ids = {id(p) for group in gate_optimizer.param_groups for p in group["params"]}
    assert gate_opt_ids == gate_ids
    assert not model_ids & gate_ids
    assert gate_optimizer.param_groups[0].get("weight_decay", 0) == 0


def test_regulariser_clock_advances_with_optimizer_steps(tmp_path):
    hparams = load_yaml("mini/conformer_adrop.yaml", tmp_path)
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams)
    brain.total_train_steps = 10
    brain.optimizer_step = 5
    assert brain.training_progress() == pytest.approx(0.5)
    brain.optimizer_step = 50
    assert brain.training_progress() == 1.0


def test_lr_cools_down_to_zero_over_the_yaml_share_of_the_run(tmp_path):
    hparams = load_yaml("mini/conformer_dense.yaml", tmp_path, warmup_steps=4, number_of_epochs=3)
    hparams["train_dataloader_opts"] = {"batch_size": 2}
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams)
    init_progress_clock(brain, list(range(20)), hparams)  # 10 updates an epoch, 30 in all
    schedule = hparams["lr_annealing"]
    assert (schedule.total_steps, schedule.cooldown) == (30, round(30 * hparams["lr_cooldown"]))
    brain.init_optimizers()
    lrs = []
    for update in range(1, 31):
        brain.optimizer_step = update
        brain._anneal_lr()
        lrs.append(brain.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(hparams["lr"] / 4)  # warm-up
    assert lrs[3] == pytest.approx(hparams["lr"])  # the peak, at the end of the warm-up
    cooling = lrs[30 - schedule.cooldown:]
    assert all(later < earlier for earlier, later in zip(cooling, cooling[1:]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    brain.optimizer_step = 31  # past the end (a run resumed with more epochs): 0, not below
    brain._anneal_lr()
    assert brain.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    hparams = load_yaml("mini/conformer_dense.yaml", tmp_path, warmup_steps=25, number_of_epochs=3)
    hparams["train_dataloader_opts"] = {"batch_size": 2}
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams)
    init_progress_clock(brain, list(range(20)), hparams)
    assert hparams["lr_annealing"].cooldown == 5  # starts where the warm-up ends, not inside it

    # 65 updates, cool-down 26: SpeechBrain's line ends at -2e-19 there, the rate at 0
    hparams = load_yaml("mini/conformer_dense.yaml", tmp_path, warmup_steps=4, number_of_epochs=5)
    hparams["train_dataloader_opts"] = {"batch_size": 2}
    brain = ASRBrain(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams)
    init_progress_clock(brain, list(range(26)), hparams)
    assert (hparams["lr_annealing"].total_steps, hparams["lr_annealing"].cooldown) == (65, 26)
    brain.init_optimizers()
    brain.optimizer_step = 65
    brain._anneal_lr()
    assert brain.optimizer.param_groups[0]["lr"] == 0.0


def test_augmentation_can_be_switched_off_in_yaml(tmp_path):
    hparams = load_yaml("mini/conformer_dense.yaml", tmp_path)  # the mini recipe has none
    brain, loss = one_training_step(hparams)
    assert brain._augmenters(sb.Stage.TRAIN) == (None, None)
    assert math.isfinite(loss.item())


def test_intermediate_ctc_adds_a_loss_on_its_layer_in_training_only(tmp_path):
    def step(inter_weight, ctc_weight=0.7):
        torch.manual_seed(0)
        hparams = load_yaml("mini/conformer_dense.yaml", tmp_path, inter_ctc_layers=[2],
                            inter_ctc_weight=inter_weight, ctc_weight=ctc_weight)
        brain, loss = one_training_step(hparams)
        return brain, loss, hparams["modules"]["asr"].Transformer.encoder

    brain, plain, _ = step(0.0)
    assert brain._inter_ctc_layers(sb.Stage.TRAIN) == ()
    brain, mixed, _ = step(0.5)
    assert brain._inter_ctc_layers(sb.Stage.TRAIN) == (2,)
    assert brain._inter_ctc_layers(sb.Stage.VALID) == ()  # evaluation does not compute it
    assert math.isfinite(mixed.item()) and mixed.item() != pytest.approx(plain.item())
    # All of the loss on layer 2's CTC: layer 2 learns, the layers above it get nothing.
    brain, _, encoder = step(1.0, ctc_weight=1.0)
    assert encoder.layers[1].ffn_module2[1].ffn[0].weight.grad.abs().sum() > 0
    above = encoder.layers[-1].ffn_module2[1].ffn[0].weight.grad
    assert above is None or not above.any()
    assert not encoder.layers[1]._forward_hooks  # the hooks are gone after the forward


def test_intermediate_ctc_of_the_last_layer_is_the_ctc_output_and_bad_layers_are_refused():
    torch.manual_seed(0)
    model = build_asr_modules(32, d_model=48, nhead=4, num_encoder_layers=3,
                              num_decoder_layers=1, d_ffn=64, kernel_size=5, cnn_channels=(8, 8))
    model.eval()
    feats, tokens, lens = torch.randn(2, 50, 80), torch.randint(3, 30, (2, 7)), torch.ones(2)
    enc_out, ctc_logits, seq_logits, inter = model(feats, tokens, lens, inter_ctc_layers=(1, 3))
    assert len(inter) == 2 and inter[0].shape == ctc_logits.shape
    assert torch.allclose(inter[1], ctc_logits, atol=1e-6)  # in the order the layers run
    assert len(model(feats, tokens, lens)) == 3
    for bad in (0, 4):
        with pytest.raises(ValueError, match="not an encoder layer"):
            model(feats, tokens, lens, inter_ctc_layers=(bad,))


def test_tokenizer_with_more_pieces_than_outputs_is_refused(tmp_path):
    csv_path = tmp_path / "train.csv"
    lines = ["ID,duration,wav,spk_id,wrd"]
    lines += [f"u{i},1.0,x.flac,s,{text}" for i, text in
              enumerate(["THE QUICK BROWN FOX", "JUMPS OVER THE LAZY DOG", "PACK MY BOX"] * 5)]
    csv_path.write_text("\n".join(lines) + "\n")
    hparams = {"tokenizer_folder": str(tmp_path / "tok"), "train_csv": str(csv_path),
               "output_neurons": 12, "token_type": "char", "bos_index": 1, "eos_index": 2,
               "tokenizer": sentencepiece.SentencePieceProcessor()}
    train_tokenizer(hparams)
    with pytest.raises(ValueError, match=r"12_char.model: the tokenizer has \d+ pieces but the "
                                         r"model has output_neurons: 12"):
        load_tokenizer(hparams)


UNSTRUCTURED = ("magnitude", "platon", "seven")
BASELINES = ("magnitude_widths", "magnitude_global", "scratch_widths", "scratch_uniform",
             *UNSTRUCTURED, "finetune")


@pytest.mark.parametrize("scale", ["", "mini/"])
@pytest.mark.parametrize("baseline", BASELINES)
def test_every_baseline_has_a_yaml_at_both_scales_naming_its_method(scale, baseline, tmp_path):
    from conformer_prune.methods import PruningMethod

    overrides = {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "run")}
    with open(ROOT / "hparams" / f"{scale}conformer_{baseline}.yaml", encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    method = hparams["method"]
    assert isinstance(method, PruningMethod) and method.name == baseline
    expected = {"finetune": "dense", **{name: "sparse" for name in UNSTRUCTURED}}
    assert method.model_kind == expected.get(baseline, "compact")
    assert hparams["experiment_name"] == f"conformer_{baseline}{'_mini' if scale else ''}"


DURATIONS = [1.0 + (7 * i % 23) / 4 for i in range(60)]  # seconds, 1.0-6.5, mixed order


def length_sampler(**options):
    """The recipe's batch sampler over DURATIONS, 12 s batches in 4 buckets, random order."""
    from speechbrain.dataio.dataset import DynamicItemDataset

    from conformer_prune.asr_brain import LengthBatchSampler

    data = DynamicItemDataset({f"u{i}": {"duration": d} for i, d in enumerate(DURATIONS)})
    return LengthBatchSampler(data, max_batch_length=12, num_buckets=4, shuffle=True,
                              batch_ordering="random",
                              length_func=lambda example: float(example["duration"]), **options)


def test_the_brain_tells_the_batch_sampler_each_epoch_and_batches_change():
    sampler = length_sampler()
    brain = ASRBrain.__new__(ASRBrain)  # only SpeechBrain's part of the Brain is needed here
    sb.Brain.__init__(brain, modules={"m": torch.nn.Linear(1, 1)}, run_opts={"device": "cpu"})
    brain._train_loader_specifics(None, {"batch_sampler": sampler})
    # SpeechBrain calls set_epoch at each epoch on train_sampler only: it must be this one.
    assert brain.train_sampler is sampler
    epochs = []
    for epoch in (1, 2, 1):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert epochs[0] != epochs[1]  # other batches each epoch ...
    assert epochs[0] == epochs[2]  # ... drawn from the seed and the epoch (a resume sees them)


def test_ascending_epochs_take_batches_shortest_first_then_the_yaml_ordering():
    sampler = length_sampler(ascending_epochs=1)

    def longest(epoch):
        sampler.set_epoch(epoch)
        return [max(DURATIONS[int(i)] for i in batch) for batch in sampler]

    assert longest(1) == sorted(longest(1))
    assert longest(2) != sorted(longest(2))
    assert sampler._batch_ordering == "random"
