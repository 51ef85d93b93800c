"""The whole pipeline on a tiny built corpus, as a user runs it:

synth-corpus -> train.py (prepare, tokenizer, gated training, test) -> shrink -> decode -> report.
A tiny model and one short epoch: the point is that every stage runs, writes what
docs/FORMATS.md promises, and that the shrunk model decodes exactly as the gated one did.
"""

import json
import shutil
import sys

import pytest

from conformer_prune.cli import main as cli_main
from conformer_prune.shrink import plain_hparams
from tiny_runs import ROOT, SMALL_BATCHES, TINY_ARCH_JSON, free_port, train_tiny

GATED_YAML = "hparams/mini/conformer_adrop.yaml"
LM_WEIGHT = plain_hparams(ROOT / GATED_YAML)["lm_weight"]  # the mini YAMLs' (tuned on dev)

def train_tiny_gated(corpus, run_dir, epochs, lm=None):
    # Gates start at the threshold so that one short epoch already closes some of them.
    train_tiny(GATED_YAML, corpus, run_dir, epochs,
               "--gate_threshold=0.9", "--gate_init_retention=0.9",
               "--gate_target_params=null", lm=lm)  # the recipe's budget is above the tiny model


@pytest.fixture(scope="module")
def dense_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "dense"
    train_tiny("hparams/mini/conformer_dense.yaml", corpus, run_dir, 1)
    return run_dir


@pytest.fixture(scope="module")
def gated_run(corpus, tiny_lm, tmp_path_factory):
    """The gated recipe decoding with the LM as the mini YAMLs do (their lm_weight)."""
    run_dir = tmp_path_factory.mktemp("runs") / "adrop"
    train_tiny_gated(corpus, run_dir, epochs=2, lm=tiny_lm)
    return run_dir


def test_training_run_writes_results_history_and_alignments(gated_run):
    results = json.loads((gated_run / "results.json").read_text())
    for key in ("name", "method", "seed", "model_kind", "git_commit", "hparams_sha256"):
        assert results[key] not in (None, ""), key
    assert results["model_kind"] == "gated" and results["method"] == "adrop"
    assert {"total", "encoder", "decoder"} <= results["params"].keys()
    # What the run saw: the tiny corpus's train split, 12 s and longer utterances skipped.
    assert set(results["data"]) == {"train-clean-100", "dev-clean", "test-clean", "test-other"}
    train = results["data"]["train-clean-100"]
    assert train["utterances"] > 0 and train["skipped_too_long"] >= 0
    assert "ranks" not in results  # a plain `python train.py`
    assert results["params"]["total"] == sum(
        results["params"][part] for part in ("encoder", "decoder", "ctc")
    )
    assert results["decode"]["wall_seconds"] > 0 and results["decode"]["rtf"] > 0
    assert results["decode"]["lm_weight"] == LM_WEIGHT > 0 and results["decode"]["lm_folder"]
    for split in ("test-clean", "test-other"):
        scores = results["splits"][split]
        assert 0 <= scores["cer"] and 0 <= scores["wer"]
        assert scores["utterances"] > 0 and scores["rtf"] > 0
        assert (gated_run / f"wer_{split}.txt").read_text().startswith("%WER")

    history = [json.loads(line) for line in (gated_run / "history.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert {"train_loss", "valid_loss", "valid_wer", "regulariser", "params_if_shrunk",
            "gates"} <= history[-1].keys()
    assert {gate["site"] for gate in history[-1]["gates"]} == {"ffn1", "ffn2", "query", "value",
                                                                "conv"}
    assert "mean_retention" in (gated_run / "train_log.txt").read_text()


def test_shrunk_model_is_smaller_and_decodes_exactly_like_the_gated_model(gated_run, corpus):
    compact = gated_run / "compact"
    assert cli_main(["shrink", str(gated_run), "--out", str(compact)]) == 0
    assert cli_main(["decode", str(compact), "--data-folder", str(corpus)]) == 0

    gated = json.loads((gated_run / "results.json").read_text())
    shrunk = json.loads((compact / "results.json").read_text())
    assert shrunk["model_kind"] == "shrunk"
    # The search fused the same LM: the folder carries it (self-contained)
    assert shrunk["decode"]["lm_weight"] == LM_WEIGHT and (compact / "lm.ckpt").exists()
    assert shrunk["params"]["total"] < gated["params"]["total"]
    parts = ("total", "encoder", "decoder", "ctc")
    assert {part: shrunk["params"][part] for part in parts} == gated["gates"]["params_if_shrunk"]
    assert shrunk["params"]["gate_logits"] == 0
    assert 0 < shrunk["params"]["encoder_nonzero"] <= shrunk["params"]["encoder"]
    for split in ("test-clean", "test-other"):
        for metric in ("wer", "cer", "ctc_greedy_wer"):
            assert shrunk["splits"][split][metric] == gated["splits"][split][metric], (split, metric)
        assert (compact / f"wer_{split}.txt").exists()

    dashboard = gated_run / "dashboard"
    assert cli_main(["report", str(gated_run), "--out", str(dashboard)]) == 0
    assert (dashboard / "index.html").exists() and (dashboard / "runs.csv").exists()


def test_decode_takes_another_search_int8_and_ctc_weight_without_touching_results_json(
        gated_run, corpus):
    compact = gated_run / "compact"
    if not (compact / "results.json").exists():
        assert cli_main(["shrink", str(gated_run), "--out", str(compact)]) == 0
        assert cli_main(["decode", str(compact), "--data-folder", str(corpus)]) == 0
    joint = (compact / "results.json").read_text()
    assert cli_main(["decode", str(compact), "--data-folder", str(corpus), "--splits",
                     "test-clean", "--search", "rescore", "--int8", "--ctc-weight", "0.5",
                     "--beam-size", "3"]) == 0
    assert (compact / "results.json").read_text() == joint
    rescored = json.loads((compact / "results_rescore_int8.json").read_text())
    assert rescored["decode"]["searcher"] == "ctc_prefix_beam_attention_rescore"
    assert rescored["decode"]["int8"] is True
    assert rescored["decode"]["ctc_weight"] == 0.5 and rescored["decode"]["beam_size"] == 3
    assert rescored["decode"]["lm_weight"] == LM_WEIGHT  # the folder's LM rescores the n-best too
    assert 0 <= rescored["splits"]["test-clean"]["wer"]
    assert (compact / "wer_test-clean_rescore_int8.txt").exists()


@pytest.mark.parametrize("missing", ["normalizer.ckpt", "tokenizer.ckpt", "arch.json",
                                     "model.ckpt"])
def test_decode_names_a_file_missing_from_the_compact_folder(gated_run, corpus, tmp_path,
                                                             capsys, missing):
    compact = tmp_path / "compact"
    shutil.copytree(gated_run / "compact", compact)
    (compact / missing).unlink()
    assert cli_main(["decode", str(compact), "--data-folder", str(corpus)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: {compact / missing}: missing from the compact model folder; "
                     "write the folder again with `conformer-prune shrink`"]


def test_a_killed_run_resumes_from_its_last_checkpoint(gated_run, corpus, tiny_lm):
    """Starting the finished run again with one more epoch trains only that epoch."""
    train_tiny_gated(corpus, gated_run, epochs=3, lm=tiny_lm)
    history = [json.loads(line) for line in (gated_run / "history.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]


def test_structured_baselines_train_at_the_gated_model_size(gated_run, dense_run, corpus,
                                                            tmp_path):
    """Dense run, then the magnitude and from-scratch baselines matched to the shrunk gated
    model, each through `python train.py <yaml>`; results.json says what each was matched to."""
    compact = gated_run / "compact"
    if not (compact / "arch.json").exists():
        assert cli_main(["shrink", str(gated_run), "--out", str(compact)]) == 0
    dense = dense_run
    runs = {}
    for name in ("magnitude_widths", "magnitude_global", "scratch_uniform"):
        runs[name] = tmp_path / name
        sources = [f"--adrop_compact={compact}"]
        if name.startswith("magnitude"):
            sources.append(f"--dense_run={dense}")
        train_tiny(f"hparams/mini/conformer_{name}.yaml", corpus, runs[name], 1, *sources)
    target = json.loads((compact / "shrink_report.json").read_text())["params"]["after"]
    for name, run_dir in runs.items():
        results = json.loads((run_dir / "results.json").read_text())
        assert results["method"] == name and results["model_kind"] == "compact"
        assert results["size_target"]["encoder"] == target["encoder"]
        assert abs(results["params"]["encoder"] / target["encoder"] - 1) <= 0.02, name
        assert results["params"]["decoder"] == target["decoder"]
    widths = json.loads((runs["magnitude_widths"] / "results.json").read_text())["widths"]
    assert widths == json.loads((compact / "arch.json").read_text())["widths"]

    # The compact modules (ragged heads, phantom LayerNorm) train under torchrun too, every
    # parameter reached by DDP's reduction and the ranks ending identical.
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port", str(free_port()))
    train_tiny("hparams/mini/conformer_magnitude_widths.yaml", corpus, tmp_path / "ddp", 1,
               f"--adrop_compact={compact}", f"--dense_run={dense}", launcher=torchrun)
    ranks = json.loads((tmp_path / "ddp" / "results.json").read_text())["ranks"]
    assert ranks["agree"] and ranks["world_size"] == 2

    # A baseline run exports like a gated one, and its inference folder decodes alike.
    run = runs["scratch_uniform"]
    assert cli_main(["shrink", str(run), "--out", str(run / "compact")]) == 0
    assert cli_main(["decode", str(run / "compact"), "--data-folder", str(corpus)]) == 0
    trained = json.loads((run / "results.json").read_text())
    exported = json.loads((run / "compact" / "results.json").read_text())
    assert exported["params"]["encoder"] == trained["params"]["encoder"]
    for split in ("test-clean", "test-other"):
        assert exported["splits"][split]["wer"] == trained["splits"][split]["wer"], split
    dashboard = tmp_path / "dashboard"
    assert cli_main(["report", str(dense), *map(str, runs.values()), str(gated_run),
                     "--out", str(dashboard)]) == 0
    table = (dashboard / "runs.md").read_text()
    assert "magnitude_global" in table and "within 2%" in table


def test_unstructured_pruning_leaves_exact_zeros_stored_sparse_that_decode_alike(
        dense_run, corpus, tmp_path):
    """SEVEN from the dense run to 30% of the encoder layers' weight matrices: the saved model
    has exactly that many non-zeros, results.json counts them, the compact folder stores them
    as bitmask + values in fewer bytes, and it decodes to the run's own WER."""
    import torch
    from speechbrain.utils.checkpoints import Checkpointer

    from conformer_prune.methods.unstructured import scored_parameters
    from conformer_prune.model import build_asr_modules

    run = tmp_path / "seven"
    train_tiny("hparams/mini/conformer_seven.yaml", corpus, run, 2, f"--dense_run={dense_run}",
               "--prune_final_keep=0.3", f"--dynamic_batching={SMALL_BATCHES}")
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "seven" and results["model_kind"] == "sparse"
    sparsity = results["sparsity"]
    assert sparsity["scored_nonzero"] == round(0.3 * sparsity["scored"])

    checkpoint = Checkpointer(run / "save").find_checkpoint().path  # the latest
    model = build_asr_modules(**json.loads(TINY_ARCH_JSON))
    model.load_state_dict(torch.load(checkpoint / "model.ckpt"))
    scored = scored_parameters(model)
    assert sum(int(torch.count_nonzero(p)) for _, p in scored) == sparsity["scored_nonzero"]
    zeros = sparsity["scored"] - sparsity["scored_nonzero"]
    assert results["params"]["total"] - results["params"]["nonzero"] >= zeros

    compact = run / "compact"
    assert cli_main(["shrink", str(run), "--out", str(compact)]) == 0
    sizes = json.loads((compact / "shrink_report.json").read_text())["bytes"]
    assert sizes["model_ckpt"] < sizes["dense_tensors"]
    assert cli_main(["decode", str(compact), "--data-folder", str(corpus)]) == 0
    decoded = json.loads((compact / "results.json").read_text())
    assert decoded["params"]["nonzero"] == results["params"]["nonzero"]
    for split in ("test-clean", "test-other"):
        assert decoded["splits"][split]["wer"] == results["splits"][split]["wer"], split

    # The same run as a fine-tuned variant of the dense base, stored as a delta: with drop rate
    # 0 the variant rebuilt from base + delta decodes exactly as the run did.
    delta = tmp_path / "delta"
    assert cli_main(["delta", "make", str(dense_run), str(run), "--drop", "0",
                     "--out", str(delta)]) == 0
    assert cli_main(["decode", str(delta / "model"), "--data-folder", str(corpus)]) == 0
    variant = json.loads((delta / "model" / "results.json").read_text())
    for split in ("test-clean", "test-other"):
        assert variant["splits"][split]["wer"] == results["splits"][split]["wer"], split


def test_a_fine_tuned_variant_ships_as_a_pruned_delta_and_the_sweep_resumes(
        dense_run, corpus, tmp_path):
    """conformer_farfield.yaml fine-tunes the dense run with AdamR; `delta make --q-search`
    writes a delta of a tenth of the entries with per-layer q; `delta sweep` writes one point
    per method, drop rate and seed (magnitude, deterministic, once), scores the base's test
    split for seed 0 only, and a rerun recomputes nothing; `delta report` tabulates it."""
    from conformer_prune.delta_search import DEV_GRID_POINTS

    run = tmp_path / "variant"
    train_tiny("hparams/mini/conformer_farfield.yaml", corpus, run, 1,
               f"--dense_run={dense_run}", "--adamr_pull=0.1",
               f"--dynamic_batching={SMALL_BATCHES}")
    assert json.loads((run / "results.json").read_text())["method"] == "finetune"

    delta = tmp_path / "delta"
    assert cli_main(["delta", "make", str(dense_run), str(run), "--method", "darex_q",
                     "--drop", "0.9", "--q-search", "analytic", "--data-folder", str(corpus),
                     "--out", str(delta)]) == 0
    info = json.loads((delta / "delta.json").read_text())
    assert isinstance(info["q"], dict) and info["q_search"]["search"] == "analytic"
    assert info["delta_nonzero"] < 0.15 * info["delta_entries"]
    assert cli_main(["decode", str(delta / "model"), "--data-folder", str(corpus)]) == 0

    sweep_dir = tmp_path / "sweep"
    sweep = ["delta", "sweep", str(dense_run), str(run), "--data-folder", str(corpus),
             "--base-data-folder", str(corpus), "--drops", "0.9", "--seeds", "0,1",
             "--out", str(sweep_dir)]
    assert cli_main(sweep) == 0
    points = {p.name: p for p in (sweep_dir / "points").glob("*.json")}
    random_methods = ("dare", "darex_q_dev", "darex_q_unlabelled", "darex_q_analytic")
    assert sorted(points) == sorted([f"{m}_p0.9_s{s}.json" for m in random_methods
                                     for s in (0, 1)] + ["magnitude_p0.9_s0.json"])
    first, second = (json.loads(points[f"dare_p0.9_s{s}.json"].read_text()) for s in (0, 1))
    assert first["wer"]["base"] is not None and second["wer"]["base"] is None
    dev_search = json.loads((sweep_dir / "q" / "darex_q_dev_p0.9.json").read_text())
    assert len(dev_search["tried"]) == DEV_GRID_POINTS
    written = {name: p.stat().st_mtime_ns for name, p in points.items()}
    assert cli_main(sweep) == 0
    assert {name: p.stat().st_mtime_ns for name, p in points.items()} == written

    dashboard = tmp_path / "dashboard"
    assert cli_main(["delta", "report", str(sweep_dir), "--out", str(dashboard)]) == 0
    table = (dashboard / "delta.md").read_text()
    assert "darex_q_analytic" in table and (dashboard / "delta_wer_vs_bytes.png").exists()
