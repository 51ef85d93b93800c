"""Shrink exactness, compact save/load, and SpeechBrain inference export on tiny random models."""

import copy
import json

import pytest
import torch

from conformer_prune.gated_conformer import encoder_layers, insert_gates, params_if_shrunk
from conformer_prune.gates import iter_gates
from conformer_prune.model import build_asr_modules, count_params, param_state
from conformer_prune.shrink import (
    export_inference_folder,
    load_compact,
    save_compact,
    shrink_modules,
)
from tiny import TINY_ARCH, char_tokenizer

# Four heads of width 4 and a 5-tap depthwise kernel: room for ragged and emptied heads.
ARCH = {**TINY_ARCH, "nhead": 4, "kernel_size": 5}
ATOL = 1e-5


def gated_model(sites=("ffn", "query", "value", "conv"), seed=0):
    """A tiny gated model in eval mode with random logits, about a third of them closed."""
    torch.manual_seed(seed)
    modules = insert_gates(build_asr_modules(**ARCH), sites=sites)
    with torch.no_grad():
        for _, gate in iter_gates(modules):
            gate.logits.normal_(0.7, 1.5)
    return modules.eval()


def batch(seed=1):
    """Features with padding (wav_lens < 1) and target tokens (0 is padding, so >= 1)."""
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, 48, ARCH["n_mels"], generator=generator)
    tokens = torch.randint(1, ARCH["vocab_size"], (3, 6), generator=generator)
    return feats, torch.tensor([1.0, 0.7, 0.4]), tokens


@torch.no_grad()
def outputs(modules, feats, lens, tokens):
    """Encoder output, CTC log-probabilities and decoder output (all positions are compared,
    padded ones included: the shrink must not change them either)."""
    encoded, decoded = modules["Transformer"](modules["CNN"](feats), tokens, lens)
    return {
        "encoder": encoded,
        "ctc": modules["ctc_lin"](encoded).log_softmax(-1),
        "decoder": modules["seq_lin"](decoded),
    }


def assert_same_outputs(gated, compact, seed=1):
    data = batch(seed)
    expected, got = outputs(gated, *data), outputs(compact, *data)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=ATOL), (
            name,
            float((expected[name] - got[name]).abs().max()),
        )


def shrink_copy(gated):
    compact = copy.deepcopy(gated)
    widths = shrink_modules(compact)
    return compact, widths


def close(gate, units):
    with torch.no_grad():
        gate.logits[units] = -4.0


def open_all(gate):
    with torch.no_grad():
        gate.logits.fill_(4.0)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("sites", [("ffn",), ("query",), ("value",), ("conv",), ("query", "value")])
def test_shrink_is_exact_per_site(sites):
    gated = gated_model(sites)
    compact, widths = shrink_copy(gated)
    assert_same_outputs(gated, compact)
    assert not list(iter_gates(compact))
    json.dumps(widths)


def test_shrink_is_exact_all_sites_with_ragged_heads():
    gated = gated_model()
    compact, widths = shrink_copy(gated)
    assert_same_outputs(gated, compact)
    heads = [w["attention"] for w in widths["layers"]]
    assert any(len(set(h["query"])) > 1 or len(set(h["value"])) > 1 for h in heads)
    counts = count_params(param_state(compact))
    assert {k: counts[k] for k in ("total", "encoder", "decoder", "ctc")} == params_if_shrunk(gated)
    dense = count_params(param_state(build_asr_modules(**ARCH)))
    assert counts["total"] < dense["total"] and counts["decoder"] == dense["decoder"]


def test_shrink_is_exact_with_fully_pruned_sites():
    gated = gated_model()
    layer0, layer1 = encoder_layers(gated)
    head_dim = ARCH["d_model"] // ARCH["nhead"]
    close(layer0.ffn_module1[1].gate, slice(None))  # every FFN unit
    close(layer1.convolution_module.gate, slice(None))  # every conv channel
    mha = layer0.mha_layer
    open_all(mha.query_gate)
    open_all(mha.value_gate)
    close(mha.query_gate, slice(0, head_dim))  # every query dim of head 0: uniform attention
    close(mha.value_gate, slice(head_dim, 2 * head_dim))  # every value dim of head 1
    close(layer1.mha_layer.value_gate, slice(None))  # every head of layer 1
    compact, widths = shrink_copy(gated)
    assert_same_outputs(gated, compact)
    assert widths["layers"][0]["ffn1"] == 0
    assert widths["layers"][1]["conv"] == 0
    assert widths["layers"][0]["attention"]["query"][:2] == [0, 0]  # head 1 gone entirely
    assert widths["layers"][0]["attention"]["value"][:2] == [head_dim, 0]
    assert widths["layers"][1]["attention"] == {"query": [0] * 4, "value": [0] * 4}
    counts = count_params(param_state(compact))
    assert counts["total"] == params_if_shrunk(gated)["total"]


def test_all_open_shrink_equals_dense_count():
    gated = gated_model()
    for _, gate in iter_gates(gated):
        open_all(gate)
    compact, _ = shrink_copy(gated)
    assert_same_outputs(gated, compact)
    dense = count_params(param_state(build_asr_modules(**ARCH)))
    assert count_params(param_state(compact))["total"] == dense["total"]


def test_threshold_changes_what_is_kept():
    gated = gated_model()
    for _, gate in iter_gates(gated):
        gate.threshold = 0.8
    compact, _ = shrink_copy(gated)
    assert_same_outputs(gated, compact)


# ------------------------------------------------------------------------- save / load


def test_save_and_load_compact(tmp_path):
    gated = gated_model()
    compact, widths = shrink_copy(gated)
    save_compact(tmp_path, compact, ARCH, widths)
    saved = json.loads((tmp_path / "arch.json").read_text())
    assert saved == {"arch": ARCH, "widths": widths}
    loaded = load_compact(tmp_path).eval()
    assert_same_outputs(gated, loaded, seed=2)


def test_load_compact_names_mismatched_tensor(tmp_path):
    compact, widths = shrink_copy(gated_model())
    save_compact(tmp_path, compact, ARCH, widths)
    widths["layers"][0]["ffn2"] += 1
    saved = json.loads((tmp_path / "arch.json").read_text())
    saved["widths"] = widths
    (tmp_path / "arch.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"ffn_module2\.1\.ffn\.0\.weight.*shape"):
        load_compact(tmp_path)


# ------------------------------------------------------------------- SpeechBrain interop


def test_export_loads_offline_in_encoder_decoder_asr(tmp_path):
    import soundfile
    from speechbrain.inference.ASR import EncoderDecoderASR
    from speechbrain.processing.features import InputNormalization

    tokenizer_path, tokenizer = char_tokenizer(tmp_path)
    arch = {**ARCH, "vocab_size": tokenizer.get_piece_size(), "n_mels": 80}
    torch.manual_seed(0)
    modules = insert_gates(build_asr_modules(**arch))
    with torch.no_grad():
        for _, gate in iter_gates(modules):
            gate.logits.normal_(0.7, 1.5)
    modules.eval()
    widths = shrink_modules(modules)
    normalizer = InputNormalization(norm_type="global")
    normalizer(torch.randn(2, 50, 80) * 3 + 1, torch.ones(2))
    out = tmp_path / "compact"
    export_inference_folder(
        out, modules, arch, widths, tokenizer_path, normalizer, {"beam_size": 3, "n_fft": 400}
    )

    flac = tmp_path / "noise.flac"
    soundfile.write(flac, 0.1 * torch.randn(16000).numpy(), 16000)
    asr = EncoderDecoderASR.from_hparams(source=str(out), savedir=str(out))
    assert isinstance(asr.transcribe_file(str(flac)), str)
    loaded = asr.hparams.asr.state_dict()
    assert all(torch.equal(tensor, loaded[key]) for key, tensor in modules.state_dict().items())
    assert torch.equal(asr.hparams.normalize.glob_mean, normalizer.glob_mean)


def test_shrink_subcommand_on_a_run_folder(tmp_path):
    import argparse

    from speechbrain.processing.features import InputNormalization
    from speechbrain.utils.checkpoints import Checkpointer

    from conformer_prune.shrink import add_parser, shrink_run

    # A run folder as train.py leaves it: resolved YAML, tokenizer, SpeechBrain checkpoints.
    run_dir = tmp_path / "results" / "adrop" / "1986"
    tokenizer_dir = run_dir / "save" / "tokenizer"
    tokenizer_dir.mkdir(parents=True)
    tokenizer_path, tokenizer = char_tokenizer(tmp_path)
    (tokenizer_dir / "30_char.model").write_bytes(tokenizer_path.read_bytes())
    arch = {**ARCH, "vocab_size": tokenizer.get_piece_size()}
    (run_dir / "hyperparams.yaml").write_text(
        f"arch: {json.dumps(arch)}\n"
        "gate_threshold: 0.5\n"
        "test_beam_size: 3\n"
        "n_fft: 400\n"
        "n_mels: 16\n"
        "tokenizer: !new:sentencepiece.SentencePieceProcessor\n"
        "asr_modules: !apply:conformer_prune.gated_conformer.insert_gates\n"
        "    sites: [ffn, value]\n"
    )
    torch.manual_seed(0)
    gated = insert_gates(build_asr_modules(**arch), sites=("ffn", "value"))
    with torch.no_grad():
        for _, gate in iter_gates(gated):
            gate.logits.normal_(0.7, 1.5)
    normalizer = InputNormalization(norm_type="global")
    normalizer(torch.randn(2, 30, 16), torch.ones(2))
    recoverables = {"model": gated, "normalizer": normalizer}
    Checkpointer(run_dir / "save", recoverables).save_checkpoint(meta={"WER": 90.0})

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "compact"
    args = parser.parse_args(["shrink", str(run_dir), "--out", str(out), "--threshold", "0.6"])
    assert args.func(args) == 0

    for name in ("arch.json", "model.ckpt", "tokenizer.ckpt", "normalizer.ckpt"):
        assert (out / name).exists(), name
    assert (out / "hyperparams.yaml").exists()
    report = json.loads((out / "shrink_report.json").read_text())
    assert report["threshold"] == 0.6
    assert report["params"]["after"]["total"] < report["params"]["before"]["total"]
    for _, gate in iter_gates(gated):
        gate.threshold = 0.6
    compact = load_compact(out).eval()
    assert report["params"]["after"] == params_if_shrunk(gated)
    assert_same_outputs(gated.eval(), compact)
    # Modules with no gate (the convolution modules here) are compact too, every unit kept:
    # one inference code for every layer, pruned or not.
    for layer in report["widths"]["layers"]:
        assert set(layer) == {"ffn1", "ffn2", "attention", "conv"}
        assert layer["conv"] == ARCH["d_model"]

    # A checkpoint folder works too; its run folder is two levels up.
    checkpoint = next((run_dir / "save").glob("CKPT+*"))
    assert shrink_run(checkpoint, tmp_path / "from_ckpt")["checkpoint"] == str(checkpoint)


# ------------------------------------------------------------ the compact attention's fast path


@pytest.mark.parametrize("time", [1, 2, 7, 40])
def test_relative_shift_view_equals_speechbrains_rel_shift(time):
    from speechbrain.nnet.attention import RelPosMHAXL

    from conformer_prune.shrink import relative_shift_view

    positions = torch.randn(2, 3, time, 2 * time - 1)
    assert torch.equal(relative_shift_view(positions), RelPosMHAXL(12, 3).rel_shift(positions))


def test_inference_attention_equals_the_general_path():
    """In eval mode without autograd the compact attention takes `_inference_attention`; the
    same module with autograd on takes relpos_attention, SpeechBrain's steps. Both give the
    same output, with a value-only head, an emptied head and padded keys."""
    from conformer_prune.shrink import RaggedRelPosMHAXL
    from speechbrain.nnet.attention import RelPosEncXL

    torch.manual_seed(0)
    mha = RaggedRelPosMHAXL(16, 4, query_widths=[0, 3, 4, 1], value_widths=[2, 0, 4, 3]).eval()
    with torch.no_grad():
        for parameter in mha.parameters():
            parameter.normal_()
    x = torch.randn(3, 9, 16)
    pos_embs = RelPosEncXL(16)(x)
    padding = torch.arange(9)[None, :] >= torch.tensor([9, 6, 2])[:, None]
    with torch.no_grad():
        fast, _ = mha(x, x, x, pos_embs, key_padding_mask=padding)
    general, _ = mha(x, x, x, pos_embs, key_padding_mask=padding)
    assert torch.allclose(fast, general.detach(), atol=1e-5), float((fast - general).abs().max())


@pytest.mark.parametrize("kept, total", [(5, 12), (12, 12), (1, 12)])
def test_phantom_layer_norm_equals_layer_norm_over_all_channels(kept, total):
    """The kept channels of LayerNorm(total) over [x, phantom constants], with an offset that
    would expose a cancelling formula."""
    from conformer_prune.shrink import PhantomLayerNorm

    torch.manual_seed(0)
    norm = PhantomLayerNorm(kept, total)
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.normal_(mean=3.0)
    x = torch.randn(2, 7, kept) * 2 + 3.0
    full = torch.cat([x, norm.phantom.expand(2, 7, -1)], dim=-1)
    expected = torch.nn.functional.layer_norm(full, (total,))[..., :kept] * norm.weight + norm.bias
    assert torch.allclose(norm(x), expected, atol=1e-5)

