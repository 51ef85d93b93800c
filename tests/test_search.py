"""The cached joint search against SpeechBrain's, and CompactASR's three searches."""

import json

import soundfile
import torch
from speechbrain.decoders import S2STransformerBeamSearcher
from speechbrain.decoders.ctc import ctc_greedy_decode
from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder
from speechbrain.processing.features import InputNormalization

from conformer_prune.inference import load_compact_asr
from conformer_prune.model import build_asr_modules
from conformer_prune.search import CachedTransformerBeamSearcher
from conformer_prune.shrink import export_inference_folder
from tiny import TINY_ARCH, char_tokenizer

ARCH = {**TINY_ARCH, "num_decoder_layers": 2, "vocab_size": 30}


def searcher(cls, asr, beam_size=4, ctc_weight=0.4):
    scorer = ScorerBuilder(full_scorers=[], partial_scorers=[CTCScorer(asr.ctc_lin, 0, 2)],
                           weights={"ctc": ctc_weight})
    return cls(modules=[asr.Transformer, asr.seq_lin], bos_index=1, eos_index=2,
               min_decode_ratio=0.0, max_decode_ratio=1.0, beam_size=beam_size,
               using_eos_threshold=False, length_normalization=True, scorer=scorer)


def test_cached_search_finds_the_hypotheses_and_scores_of_speechbrains():
    torch.manual_seed(0)
    asr = build_asr_modules(**ARCH).eval()
    # Sharpen the decoder so that hypotheses end before the length limit, with padding in
    # the batch so that the cross-attention mask matters.
    with torch.no_grad():
        asr.seq_lin.w.weight.mul_(8)
        enc = torch.randn(3, 20, ARCH["d_model"])
        lens = torch.tensor([1.0, 0.75, 0.5])
        hyps, _, scores, _ = searcher(S2STransformerBeamSearcher, asr)(enc, lens)
        cached_hyps, _, cached_scores, _ = searcher(CachedTransformerBeamSearcher, asr)(enc, lens)
    assert [list(h) for h in cached_hyps] == [list(h) for h in hyps]
    assert torch.allclose(cached_scores, scores, atol=1e-5)
    assert any(len(h) < 20 for h in hyps)  # some ended on eos, not at the limit


def export_tiny(tmp_path, **decode_opts):
    tokenizer_path, tokenizer = char_tokenizer(tmp_path)
    arch = {**ARCH, "vocab_size": tokenizer.get_piece_size() + 2, "n_mels": 80}
    torch.manual_seed(1)
    modules = build_asr_modules(**arch).eval()
    normalizer = InputNormalization(norm_type="global")
    normalizer(torch.randn(2, 50, 80) * 3 + 1, torch.ones(2))
    widths = {"layers": [{} for _ in range(arch["num_encoder_layers"])]}
    out = tmp_path / "model"
    export_inference_folder(out, modules, arch, widths, tokenizer_path, normalizer,
                            {"beam_size": 3, **decode_opts})
    return out


def test_compact_asr_runs_each_search_with_the_folders_settings(tmp_path):
    folder = export_tiny(tmp_path, ctc_weight=0.3)
    wavs = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(2))
    lens = torch.tensor([1.0, 0.6])
    soundfile.write(tmp_path / "a.flac", wavs[0].numpy(), 16000)

    joint = load_compact_asr(folder, search="joint")
    assert joint.hparams.ctc_weight == 0.3 and joint.hparams.beam_size == 3
    assert isinstance(joint.mods.decoder, CachedTransformerBeamSearcher)
    assert isinstance(joint.transcribe_file(str(tmp_path / "a.flac")), str)
    texts, tokens = joint.transcribe_batch(wavs, lens)
    with torch.no_grad():
        encoded = joint.encode_batch(wavs, lens)
        reference, _, _, _ = searcher(S2STransformerBeamSearcher, joint.model, 3, 0.3)(
            encoded, lens)
        log_probs = torch.log_softmax(joint.model.ctc_lin(encoded), dim=-1)
    assert tokens == [list(map(int, h)) for h in reference]

    greedy = load_compact_asr(folder, search="greedy")
    assert greedy.transcribe_batch(wavs, lens)[1] == ctc_greedy_decode(log_probs, lens, 0)

    overridden = load_compact_asr(folder, search="rescore", overrides={"beam_size": 5})
    assert overridden.hparams.beam_size == 5
    texts, tokens = overridden.transcribe_batch(wavs, lens)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


def test_attention_scores_of_a_padded_batch_equal_one_at_a_time(tmp_path):
    asr = load_compact_asr(export_tiny(tmp_path), search="rescore")
    wavs = 0.1 * torch.randn(2, 12000, generator=torch.Generator().manual_seed(3))
    lens = torch.tensor([1.0, 0.5])
    hypotheses = [(0, [5, 6, 7, 8]), (0, [5]), (1, [9, 10]), (1, [])]
    with torch.no_grad():
        encoded = asr.encode_batch(wavs, lens)
        batched = asr.attention_scores(encoded, lens, *zip(*hypotheses))
        single = [asr.attention_scores(encoded[i: i + 1], lens[i: i + 1], [0], [ids])
                  for i, ids in hypotheses]
    assert torch.allclose(batched, torch.cat(single), atol=1e-5)


def test_detokenize_drops_ids_the_tokenizer_does_not_have(tmp_path):
    asr = load_compact_asr(export_tiny(tmp_path), search="greedy")
    pieces = asr.tokenizer.get_piece_size()
    ids = asr.tokenizer.encode_as_ids("THE FOX")
    assert asr.detokenize([ids + [pieces, pieces + 1]]) == ["THE FOX"]


def test_export_writes_torchscript_and_onnx_encoders_that_match_the_eager_model(tmp_path):
    from conformer_prune.cli import main as cli_main

    folder = export_tiny(tmp_path)
    assert cli_main(["export", str(folder), "--out", str(tmp_path / "ts")]) == 0
    report = json.loads((tmp_path / "ts" / "export.json").read_text())
    assert set(report["files"]) == {"float", "int8", "onnx", "onnx_int8"}
    asr = load_compact_asr(folder)
    wav = 0.1 * torch.randn(1, 23456, generator=torch.Generator().manual_seed(4))
    loaded = torch.jit.load(str(tmp_path / "ts" / "encoder.ts"))
    with torch.no_grad():
        states, log_probs = loaded(wav)
        eager = asr.encode_batch(wav, torch.ones(1))
    assert torch.allclose(states, eager, atol=1e-5)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:2]), atol=1e-4)
    int8 = torch.jit.load(str(tmp_path / "ts" / "encoder_int8.ts"))
    with torch.no_grad():
        assert int8(wav)[0].shape == states.shape
    # ONNX, from the filterbanks, in onnxruntime: the same states on this untraced length
    from conformer_prune.export import onnx_session
    assert report["files"]["onnx"]["max_abs_difference_vs_eager"] < 1e-3
    feats = asr.hparams.compute_features(wav)
    session = onnx_session(tmp_path / "ts" / "encoder.onnx")
    onnx_states, onnx_log_probs = session.run(None, {"filterbanks": feats.numpy()})
    assert torch.allclose(torch.from_numpy(onnx_states), eager, atol=1e-4)
    assert torch.allclose(torch.from_numpy(onnx_log_probs), log_probs, atol=1e-3)
    # onnxruntime's int8: its MatMul weights stored as int8, so a smaller file, close outputs
    import onnx

    int8_file = tmp_path / "ts" / "encoder_int8.onnx"
    graph = onnx.load(str(int8_file)).graph
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in graph.node)
    assert 0 < report["files"]["onnx_int8"]["max_abs_difference_vs_eager"] < 1.0
    int8_states, _ = onnx_session(int8_file).run(None, {"filterbanks": feats.numpy()})
    assert int8_states.shape == onnx_states.shape


def test_int8_quantises_the_encoders_linear_layers_but_not_its_attention_or_the_decoder(tmp_path):
    from conformer_prune.inference import quantize_int8
    from conformer_prune.shrink import RaggedRelPosMHAXL, build_compact

    widths = {"layers": [{"attention": {"query": [3, 0], "value": [2, 4]}, "ffn1": 5}
                         for _ in range(TINY_ARCH["num_encoder_layers"])]}
    model = build_compact(TINY_ARCH, widths).eval()
    feats = torch.randn(2, 40, TINY_ARCH["n_mels"])
    with torch.no_grad():
        before = model.Transformer.encode(model.CNN(feats), torch.ones(2))
        quantize_int8(model)
        after = model.Transformer.encode(model.CNN(feats), torch.ones(2))
    quantized = {name for name, m in model.named_modules() if "quantized" in type(m).__module__}
    assert quantized and all(name.startswith(("Transformer.encoder.", "ctc_lin."))
                             for name in quantized)
    assert all(isinstance(m.linear_pos, torch.nn.Linear) for m in model.modules()
               if isinstance(m, RaggedRelPosMHAXL))
    assert (after - before).abs().max() < 0.1 * before.abs().max()
