import argparse
import csv
import json
import re

import plotly.offline
import pytest

from conformer_prune.report import (
    ReportError,
    add_parser,
    find_run_dirs,
    load_run,
    pareto_front,
    write_report,
)

SITES = {"ffn1": 256, "ffn2": 256, "query": 144, "value": 144, "conv": 144}
LAYERS = 4
EPOCHS = 3


def results(name, method, model_kind, total, wer_clean, wer_other, **extra):
    """A results.json as docs/FORMATS.md describes it."""
    splits = {"test-clean": {"wer": wer_clean, "cer": wer_clean / 2, "utterances": 20,
                             "audio_seconds": 100.0, "decode_seconds": 5.0, "rtf": 0.05}}
    if wer_other is not None:
        splits["test-other"] = {"wer": wer_other, "cer": wer_other / 2, "utterances": 20,
                                "audio_seconds": 100.0, "decode_seconds": 6.0, "rtf": 0.06}
    return {"name": name, "method": method, "seed": 1986, "model_kind": model_kind,
            "git_commit": "abc123", "hparams_sha256": "0" * 64,
            "params": {"total": total, "encoder": int(total * 0.6),
                       "decoder": int(total * 0.35), "ctc": int(total * 0.05)},
            "flops_per_audio_second": {"encoder": total * 100.0},
            "decode": {"searcher": "ctc_attention_beam", "beam_size": 10, "ctc_weight": 0.4,
                       "wall_seconds": 11.0, "audio_seconds": 200.0, "rtf": 0.055},
            "splits": splits, **extra}


def gates(epoch):
    """Gates that close a little more each epoch, deeper layers more."""
    return [{"layer": layer, "site": site, "units": units,
             "kept": units - epoch * (layer + 1) * units // 20,
             "below_threshold": epoch * (layer + 1) * units // 20, "mean_retention": 0.8}
            for layer in range(LAYERS) for site, units in SITES.items()]


def retentions(epoch):
    """A 10-bin retention histogram that empties its middle bins epoch by epoch."""
    middle = 60 // epoch
    counts = [20 * epoch] + [middle] * 8 + [20 * epoch]
    return {"bins": 10, "counts": counts, "margin": 0.1,
            "polarised_fraction": (counts[0] + counts[-1]) / sum(counts)}


def history(gated):
    slower = 1.2 if gated else 1.0  # so that the two runs' curves differ
    lines = []
    for epoch in range(1, EPOCHS + 1):
        entry = {"epoch": epoch, "train_loss": slower * 3.0 / epoch,
                 "valid_loss": slower * 3.5 / epoch, "valid_wer": slower * 80.0 / epoch,
                 "valid_cer": 40.0 / epoch, "lr": 0.0008, "epoch_seconds": 60.0}
        if gated:
            entry.update({"regulariser": 1.0 / epoch, "regulariser_target": 0.3,
                          "params_if_shrunk": {"total": 2_000_000 - epoch * 300_000,
                                               "encoder": 1_000_000, "decoder": 700_000},
                          "gates": gates(epoch), "retentions": retentions(epoch)})
        lines.append(json.dumps(entry))
    return "\n".join(lines) + "\n"


def write_run(run_dir, results_json, history_jsonl=None):
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results_json))
    if history_jsonl is not None:
        (run_dir / "history.jsonl").write_text(history_jsonl)
    return run_dir


def write_fake_runs(root):
    """Four runs below root: dense, gated, shrunk and an old one missing most fields."""
    gated_results = results("conformer_adrop", "adrop", "gated", 2_000_000, 11.0, 26.0,
                            gates={"threshold": 0.5, "kept_fraction": 0.55,
                                   "retentions": retentions(EPOCHS)})
    return {
        "dense": write_run(root / "conformer_dense" / "1986",
                           results("conformer_dense", "dense", "dense", 2_000_000, 10.0, 25.0),
                           history(gated=False)),
        "gated": write_run(root / "conformer_adrop" / "1986", gated_results, history(gated=True)),
        "shrunk": write_run(root / "conformer_adrop_shrunk",
                            results("conformer_adrop_shrunk", "adrop", "shrunk", 1_100_000,
                                    11.0, 26.5)),
        "old": write_run(root / "old_run" / "7",
                         {"name": "old_run", "method": "dense",
                          "splits": {"test-clean": {"wer": 30.0}}}),
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report over the four fake runs, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("runs")
    dirs = write_fake_runs(root)
    out = tmp_path_factory.mktemp("report")
    return {"dirs": dirs, "out": out, "index": write_report([root], out)}


def read_csv(path):
    with path.open(newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_writes_every_file(report):
    out = report["out"]
    assert report["index"] == out / "index.html"
    expected = ["index.html", "runs.csv", "runs.md", "curves.png", "gates_conformer_adrop.png",
                "retentions_conformer_adrop.png",
                "tradeoff_params_total.png", "tradeoff_params_encoder.png",
                "tradeoff_flops.png", "tradeoff_rtf.png"]
    for name in expected:
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_page_is_self_contained_with_plotly_once(report):
    page = report["index"].read_text()
    banner = plotly.offline.get_plotlyjs()[:200]
    assert page.count(banner) == 1
    # Nothing is fetched: no external scripts or stylesheets (the browser test checks requests).
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page)
    # 2 test splits + 1 gated run (kept units, retention histogram) + training curves
    assert page.count("Plotly.newPlot(") == 5
    assert 'class="sortable"' in page


def test_csv_has_one_row_per_run_with_values(report):
    rows = read_csv(report["out"] / "runs.csv")
    assert set(rows) == {"conformer_dense", "conformer_adrop", "conformer_adrop_shrunk",
                         "old_run"}
    dense = rows["conformer_dense"]
    assert dense["method"] == "dense"
    assert dense["model_kind"] == "dense"
    assert dense["params_total"] == "2000000"
    assert dense["params_encoder"] == "1200000"
    assert dense["params_decoder"] == "700000"
    assert float(dense["wer_test-clean"]) == 10.0
    assert float(dense["cer_test-other"]) == 12.5
    assert float(dense["rtf"]) == 0.055
    assert float(dense["flops_encoder_per_audio_second"]) == 2e8
    assert float(rows["conformer_adrop"]["kept_fraction"]) == 0.55
    assert float(rows["conformer_adrop"]["polarised_fraction"]) == pytest.approx(120 / 280)
    assert rows["conformer_adrop_shrunk"]["model_kind"] == "shrunk"
    old = rows["old_run"]
    assert old["params_total"] == "" and old["wer_test-other"] == "" and old["rtf"] == ""
    assert "no params.total" in old["notes"]
    assert "no test-other WER" in old["notes"]
    assert "no history.jsonl" in old["notes"]
    assert rows["conformer_dense"]["notes"] == ""


def test_markdown_table(report):
    lines = (report["out"] / "runs.md").read_text().splitlines()
    assert lines[0].startswith("| name | method | model_kind |")
    assert len(lines) == 2 + 4
    dense = next(line for line in lines if line.startswith("| conformer_dense |"))
    assert "2,000,000" in dense and "10.00" in dense


def test_page_notes_missing_fields(report):
    page = report["index"].read_text()
    notes = page[page.index('<section id="notes">'):page.index('<section id="tradeoff">')]
    assert "old_run" in notes
    assert "no params.total: left out of the parameter plots" in notes
    assert "no test-other WER" in notes
    assert "no history.jsonl: no training curves" in notes
    assert "conformer_dense</b>" not in notes


def test_pareto_front():
    points = [(1, 10), (2, 5), (3, 7), (4, 4), (5, 4), (0.5, 12)]
    # (3, 7) loses to (2, 5); (5, 4) ties on WER with fewer params at (4, 4)
    assert pareto_front(points) == [5, 0, 1, 3]
    assert pareto_front([(2, 5), (2, 5)]) == [0, 1]  # equal points do not beat each other
    assert pareto_front([(1, 1)]) == [0]
    assert pareto_front([]) == []


def test_load_run_reads_gates_and_history(report):
    run = load_run(report["dirs"]["gated"])
    assert run["name"] == "conformer_adrop" and run["model_kind"] == "gated"
    assert run["params"]["total"] == 2_000_000
    assert run["splits"]["test-other"]["wer"] == 26.0
    assert [e["epoch"] for e in run["history"]] == [1, 2, 3]
    assert run["history"][-1]["params_if_shrunk"] == 1_100_000
    assert len(run["history"][-1]["gates"]) == LAYERS * len(SITES)
    assert run["notes"] == []


def test_load_run_missing_fields_become_notes(report):
    run = load_run(report["dirs"]["old"])
    assert run["params"]["total"] is None and run["history"] is None and run["flops"] is None
    assert run["model_kind"] == ""
    assert "no params.total: left out of the parameter plots" in run["notes"]


def test_one_run_alone(tmp_path):
    dirs = write_fake_runs(tmp_path / "runs")
    index = write_report([dirs["shrunk"]], tmp_path / "out")
    assert index.is_file()
    assert set(read_csv(tmp_path / "out" / "runs.csv")) == {"conformer_adrop_shrunk"}
    assert "No run has gates in history.jsonl." in index.read_text()


def test_run_without_any_wer(tmp_path):
    write_run(tmp_path / "runs" / "empty", {"name": "empty"})
    index = write_report([tmp_path / "runs"], tmp_path / "out")
    page = index.read_text()
    assert "no WER for any split" in page
    assert "No run has both a WER" in page


def test_repeated_names_get_unique_labels(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs / "seeds" / str(seed), {"name": "seeds", "seed": seed})
    write_run(runs / "adrop" / "1", {"name": "adrop", "seed": 1, "model_kind": "gated"})
    write_run(runs / "adrop" / "1" / "shrunk", {"name": "adrop", "seed": 1, "model_kind": "shrunk"})
    for folder in ("a", "b"):
        write_run(runs / "twins" / folder, {"name": "twins"})
    write_report([runs], tmp_path / "out")
    assert set(read_csv(tmp_path / "out" / "runs.csv")) == {
        "seeds [1]", "seeds [2]", "adrop [gated]", "adrop [shrunk]", "twins [a]", "twins [b]"}


def test_find_run_dirs_searches_below_and_drops_repeats(tmp_path):
    dirs = write_fake_runs(tmp_path)
    found = find_run_dirs([tmp_path, dirs["gated"]])
    assert sorted(found) == sorted(dirs.values())
    with pytest.raises(ReportError, match="nothing: not a folder"):
        find_run_dirs([tmp_path / "nothing"])


def test_folder_without_results(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=re.escape(f"{tmp_path / 'empty'}: no results.json")):
        write_report([tmp_path / "empty"], tmp_path / "out")


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"params": {"total": "many"}}', "params.total: expected a number"),
    ('{"splits": {"test-clean": {"wer": "low"}}}', "splits.test-clean.wer: expected a number"),
    ('{"splits": [1]}', "splits: expected a JSON object"),
])
def test_malformed_results_names_the_file(tmp_path, text, message):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "results.json"
    path.write_text(text)
    with pytest.raises(ReportError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        write_report([tmp_path], tmp_path / "out")


@pytest.mark.parametrize("bad_line, message", [
    ('{"epoch": 2, "train_loss": ', "not valid JSON"),
    ("[2]", "expected a JSON object"),
    ('{"epoch": 2, "valid_wer": "high"}', "valid_wer: expected a number"),
    ('{"epoch": 2, "gates": [{"layer": 0, "site": "ffn1", "units": 8}]}', "missing kept"),
    ('{"epoch": 2, "gates": [{"layer": 0, "site": "ffn1", "units": 0, "kept": 0}]}',
     "expected a positive number"),
    ('{"epoch": 2, "retentions": {"counts": "many"}}', "retentions.counts: expected a list"),
    ('{"epoch": 2, "retentions": {"counts": [1, "x"]}}', "retentions.counts[1]: expected a number"),
    ('{"epoch": 2, "retentions": {"polarised_fraction": "most"}}',
     "retentions.polarised_fraction: expected a number"),
])
def test_malformed_history_names_file_and_line(tmp_path, bad_line, message):
    run_dir = write_run(tmp_path / "run", results("r", "adrop", "gated", 1000, 10.0, None),
                        '{"epoch": 1, "train_loss": 2.0}\n' + bad_line + "\n")
    with pytest.raises(ReportError) as error:
        load_run(run_dir)
    assert f"{run_dir / 'history.jsonl'}:2: " in str(error.value)
    assert message in str(error.value)


def test_cli_subcommand(tmp_path, capsys):
    dirs = write_fake_runs(tmp_path / "runs")
    parser = argparse.ArgumentParser(prog="conformer-prune")
    add_parser(parser.add_subparsers(dest="command", required=True))

    # The old run alone: quick, as it has nothing to plot.
    args = parser.parse_args(["report", str(dirs["old"]), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert str(tmp_path / "out" / "index.html") in capsys.readouterr().out

    (dirs["old"] / "results.json").write_text("{")
    args = parser.parse_args(["report", str(dirs["old"]), "--out", str(tmp_path / "out2")])
    assert args.func(args) == 1
    assert str(dirs["old"] / "results.json") in capsys.readouterr().err


def test_recipes_at_several_seeds_get_mean_spread_and_only_supported_claims(tmp_path):
    """Three seeds of dense and of adrop, two of magnitude: seeds.md has mean ± sample sd (n)
    and min-max per split, states `A below B` only where every seed of A is below every seed of
    B, and the figures draw each recipe's mean with a min-max bar."""
    runs = tmp_path / "runs"
    wers = {"dense": ([40.0, 44.0, 42.0], "dense"), "adrop": ([50.0, 51.0, 55.0], "gated"),
            "magnitude": ([43.0, 47.0], "dense")}
    for name, (values, kind) in wers.items():
        for seed, wer in enumerate(values):
            result = results(name, name, kind, 1_000_000 + seed, wer, wer + 10)
            write_run(runs / name / str(seed), {**result, "seed": seed})
    write_report([runs], tmp_path / "out")
    table = (tmp_path / "out" / "seeds.md").read_text()
    assert "| dense | dense | 3 | 600,000 | 42.00 ± 2.00 (3) | 40.00-44.00 |" in table
    assert "45.00 ± 2.83 (2)" in table  # magnitude: sd of 43 and 47
    assert "test-clean: dense (42.00) below adrop (52.00) at every seed" in table
    assert "magnitude (45.00) below adrop" in table
    assert "dense (42.00) below magnitude" not in table  # 43 < 44: the ranges overlap
    page = (tmp_path / "out" / "index.html").read_text()
    assert "mean of 3 seeds" in page and "Across seeds" in page


def test_runs_decoded_with_another_lm_weight_are_never_averaged_together(tmp_path):
    runs = tmp_path / "runs"
    for seed, (wer, lm_weight) in enumerate([(40.0, 0.7), (42.0, 0.7), (50.0, 0.0), (52.0, 0.0)]):
        result = results("dense", "dense", "dense", 1_000_000, wer, None)
        result["decode"]["lm_weight"] = lm_weight
        write_run(runs / f"lm{lm_weight}" / str(seed % 2), {**result, "seed": seed % 2})
    write_report([runs], tmp_path / "out")
    table = (tmp_path / "out" / "seeds.md").read_text()
    assert "| dense [LM 0.7] | dense | 2 | 600,000 | 41.00 ± 1.41 (2) |" in table
    assert "| dense [LM 0] | dense | 2 | 600,000 | 51.00 ± 1.41 (2) |" in table
    assert {"dense [0 LM 0.7]", "dense [1 LM 0]"} <= set(read_csv(tmp_path / "out" / "runs.csv"))


def test_runs_searched_with_another_ctc_weight_or_beam_are_never_averaged_together(tmp_path):
    # A YAML's search settings changed between two decodes of the same recipe (session 11).
    runs = tmp_path / "runs"
    searches = [(0.4, 8), (0.4, 8), (0.8, 8), (0.8, 8), (0.8, 16), (0.8, 16)]
    for i, (ctc_weight, beam) in enumerate(searches):
        result = results("dense", "dense", "dense", 1_000_000, 30.0 + i, None)
        result["decode"].update(ctc_weight=ctc_weight, beam_size=beam, lm_weight=1.0)
        write_run(runs / f"ctc{ctc_weight}_beam{beam}" / str(i % 2), {**result, "seed": i % 2})
    write_report([runs], tmp_path / "out")
    table = (tmp_path / "out" / "seeds.md").read_text()
    assert "| dense [CTC 0.4 beam 8] | dense | 2 | 600,000 | 30.50 ± 0.71 (2) |" in table
    assert "| dense [CTC 0.8 beam 8] | dense | 2 | 600,000 | 32.50 ± 0.71 (2) |" in table
    assert "| dense [CTC 0.8 beam 16] | dense | 2 | 600,000 | 34.50 ± 0.71 (2) |" in table
    assert "dense [0 CTC 0.4 beam 8]" in set(read_csv(tmp_path / "out" / "runs.csv"))


def test_spread_of_one_value_and_of_none():
    from conformer_prune.report import spread

    assert spread([3.0]) == {"mean": 3.0, "sd": 0.0, "min": 3.0, "max": 3.0, "n": 1}
    assert spread([None, None]) is None
