"""`conformer-prune report`: compare runs by WER, size, speed, gates and training curves.

Reads `results.json` and `history.jsonl` (docs/FORMATS.md) of any number of run folders and
writes into one output folder:

- `index.html`: a self-contained dashboard (plotly.js inlined once, works offline),
- PNG figures of the same views (matplotlib, Agg),
- `runs.csv` and `runs.md`: one row per run,
- `seeds.csv` and `seeds.md` when a recipe ran at several seeds: one row per recipe, each WER as
  mean ± standard deviation (n) with its min-max range, and the differences between recipes
  that are larger than the spread (every seed of one below every seed of the other).

docs/DASHBOARD.md describes the views.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import sys
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from plotly.subplots import make_subplots

from conformer_prune.errors import InputError
from conformer_prune.scoring import ResultsError, read_results
from conformer_prune.sites import SITES  # the one registry of site names

PARAM_PARTS = ("total", "encoder", "decoder", "ctc", "nonzero", "encoder_nonzero")
# A baseline matched to another model's size must land within this of it (issue: equal size).
SIZE_TOLERANCE = 0.02
# tab10, used by plotly and matplotlib alike so that a method has one colour everywhere.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
# x axes of the trade-off view: key, axis title, and how to read x for a run and split.
X_AXES = (
    ("params_total", "Parameters (total)", lambda run, split: run["params"]["total"]),
    ("params_encoder", "Encoder parameters", lambda run, split: run["params"]["encoder"]),
    ("params_encoder_nonzero", "Non-zero encoder parameters",
     lambda run, split: run["params"]["encoder_nonzero"]),
    ("flops", "Encoder FLOPs per audio second", lambda run, split: run["flops"]),
    ("rtf", "Real-time factor (measured)", lambda run, split: _rtf(run, split)),
)
# Line dashes for runs past the tenth colour: plotly's names, and matplotlib's for the same.
DASHES = ("solid", "dash", "dot", "dashdot")
MPL_DASHES = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-."}
# Training curves: history key and panel title.
CURVES = (
    ("train_loss", "Train loss"),
    ("valid_loss", "Valid loss"),
    ("valid_wer", "Valid WER (%)"),
    ("params_if_shrunk", "Params if shrunk (total)"),
    ("regulariser", "Regulariser"),
    ("polarised_fraction", "Polarised retentions (share)"),
)


class ReportError(InputError):
    """A run folder that cannot be read; the message names the file (and line)."""


# ---------------------------------------------------------------- reading runs


def find_run_dirs(paths) -> list[Path]:
    """Every folder holding a results.json at or below each path, in order, without repeats."""
    if not paths:
        raise ReportError("no run folders given")
    found = {}
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path}: not a folder")
        hits = sorted(p.parent for p in path.rglob("results.json"))
        if not hits:
            raise ReportError(f"{path}: no results.json in or below this folder")
        for run_dir in hits:
            found.setdefault(run_dir.resolve(), run_dir)
    return list(found.values())


def load_run(run_dir) -> dict:
    """One run as a plain dict with checked types; missing fields are None and explained in `notes`.

    Keys: dir, name, method, model_kind, seed, params {total, encoder, decoder, ctc}, flops
    (encoder FLOPs per audio second), rtf, lm_weight (of the search's LM; 0: none), ctc_weight
    and beam_size (of the search; None when results.json does not say), splits
    {split: {wer, cer, rtf}}, kept_fraction,
    history (list of epochs, or None without history.jsonl), notes (list of str).
    """
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    results = _read_results(path)
    where = str(path)
    params = _object(results.get("params"), f"{where}: params")
    splits = _object(results.get("splits"), f"{where}: splits")
    decode = _object(results.get("decode"), f"{where}: decode")
    run = {
        "dir": run_dir,
        "name": str(results.get("name") or run_dir.name),
        "method": str(results.get("method") or results.get("model_kind") or "unknown"),
        "model_kind": str(results.get("model_kind") or ""),
        "seed": results.get("seed"),
        "params": {part: _number(params.get(part), f"{where}: params.{part}")
                   for part in PARAM_PARTS},
        "flops": _number(_object(results.get("flops_per_audio_second"),
                                 f"{where}: flops_per_audio_second").get("encoder"),
                         f"{where}: flops_per_audio_second.encoder"),
        "rtf": _number(decode.get("rtf"), f"{where}: decode.rtf"),
        # 0 for runs decoded before the LM existed: they searched without one
        "lm_weight": _number(decode.get("lm_weight", 0.0), f"{where}: decode.lm_weight"),
        "ctc_weight": _number(decode.get("ctc_weight"), f"{where}: decode.ctc_weight"),
        "beam_size": _number(decode.get("beam_size"), f"{where}: decode.beam_size"),
        "splits": {split: _split(values, f"{where}: splits.{split}")
                   for split, values in splits.items()},
        "kept_fraction": _number(_object(results.get("gates"), f"{where}: gates")
                                 .get("kept_fraction"), f"{where}: gates.kept_fraction"),
        "polarised_fraction": _polarised(_object(results.get("gates"), f"{where}: gates"),
                                         f"{where}: gates"),
        "history": _read_history(run_dir / "history.jsonl"),
        "size_target": _number(_object(results.get("size_target"), f"{where}: size_target")
                               .get("encoder"), f"{where}: size_target.encoder"),
    }
    run["notes"] = _notes(results, run)
    return run


def _read_results(path: Path) -> dict:
    try:
        return read_results(path)
    except ResultsError as err:
        raise ReportError(str(err)) from None


def _read_history(path: Path):
    """The epochs of history.jsonl, or None when the run has none."""
    if not path.is_file():
        return None
    epochs = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ReportError(f"{where}: not valid JSON ({err.msg}, column "
                                  f"{err.colno})") from None
            if not isinstance(entry, dict):
                raise ReportError(f"{where}: expected a JSON object, got {type(entry).__name__}")
            epochs.append(_epoch(entry, where, default_epoch=len(epochs) + 1))
    return epochs


def _epoch(entry: dict, where: str, default_epoch: int) -> dict:
    epoch = _number(entry.get("epoch"), f"{where}: epoch")
    shrunk = _object(entry.get("params_if_shrunk"), f"{where}: params_if_shrunk")
    gates = entry.get("gates") or []
    if not isinstance(gates, list):
        raise ReportError(f"{where}: gates: expected a list, got {type(gates).__name__}")
    return {
        "epoch": default_epoch if epoch is None else epoch,
        "train_loss": _number(entry.get("train_loss"), f"{where}: train_loss"),
        "valid_loss": _number(entry.get("valid_loss"), f"{where}: valid_loss"),
        "valid_wer": _number(entry.get("valid_wer"), f"{where}: valid_wer"),
        "regulariser": _number(entry.get("regulariser"), f"{where}: regulariser"),
        "params_if_shrunk": _number(shrunk.get("total"), f"{where}: params_if_shrunk.total"),
        "gates": [_gate(gate, f"{where}: gates[{i}]") for i, gate in enumerate(gates)],
        "polarised_fraction": _polarised(entry, where),
        "retention_counts": _retention_counts(entry, where),
    }


def _polarised(holder: dict, where: str):
    """`retentions.polarised_fraction` of a history entry or results.json's gates; None if absent."""
    retentions = _object(holder.get("retentions"), f"{where}: retentions")
    return _number(retentions.get("polarised_fraction"), f"{where}: retentions.polarised_fraction")


def _retention_counts(entry: dict, where: str):
    """The retention histogram (units per equal bin of [0, 1]) of an epoch; None if absent."""
    counts = _object(entry.get("retentions"), f"{where}: retentions").get("counts")
    if counts is None:
        return None
    if not isinstance(counts, list) or not counts:
        raise ReportError(f"{where}: retentions.counts: expected a list of numbers, got {counts!r}")
    return [_number(c, f"{where}: retentions.counts[{i}]") for i, c in enumerate(counts)]


def _gate(gate, where: str) -> dict:
    gate = _object(gate, where)
    missing = [key for key in ("layer", "site", "units", "kept") if gate.get(key) is None]
    if missing:
        raise ReportError(f"{where}: missing {', '.join(missing)}")
    units = _number(gate["units"], f"{where}.units")
    if units <= 0:
        raise ReportError(f"{where}.units: expected a positive number, got {gate['units']!r}")
    return {"layer": int(_number(gate["layer"], f"{where}.layer")), "site": str(gate["site"]),
            "units": units, "kept": _number(gate["kept"], f"{where}.kept")}


def _split(values, where: str) -> dict:
    values = _object(values, where)
    return {key: _number(values.get(key), f"{where}.{key}") for key in ("wer", "cer", "rtf")}


def _object(value, where: str) -> dict:
    """A JSON object; {} when absent or null, so that its fields read as missing."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"{where}: expected a JSON object, got {value!r}")
    return value


def _number(value, where: str):
    """A JSON number as float; None when absent or null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _notes(results: dict, run: dict) -> list[str]:
    """What this run lacks, each with the consequence for the dashboard."""
    notes = []
    if not results.get("name"):
        notes.append("results.json has no name: named after its folder")
    if not results.get("method"):
        notes.append(f"results.json has no method: shown as '{run['method']}'")
    if run["params"]["total"] is None:
        notes.append("no params.total: left out of the parameter plots")
    if not _has_wer(run):
        notes.append("no WER for any split: left out of the trade-off plots")
    if run["history"] is None:
        notes.append("no history.jsonl: no training curves")
    elif run["model_kind"] == "gated" and not any(epoch["gates"] for epoch in run["history"]):
        notes.append("gated run without gates in history.jsonl: no gate heatmap")
    gap = _size_gap(run)
    if gap is not None:
        within = "within" if abs(gap) <= SIZE_TOLERANCE else "NOT within"
        notes.append(f"encoder {100 * gap:+.1f}% against its size target "
                     f"({run['size_target']:,.0f}): {within} {100 * SIZE_TOLERANCE:.0f}%")
    return notes


def _size_gap(run: dict):
    """Relative gap of the encoder to the size the run was matched to, or None."""
    if run["size_target"] is None or run["params"]["encoder"] is None:
        return None
    return run["params"]["encoder"] / run["size_target"] - 1.0


def _has_wer(run: dict) -> bool:
    return any(split["wer"] is not None for split in run["splits"].values())


# ---------------------------------------------------------------- across runs


def pareto_front(points) -> list[int]:
    """Indices of the (x, y) points that no other point beats: lower is better on both.

    A point is dominated when another is no worse on both coordinates and better on one.
    The indices come sorted by x, ready to draw the front as a line.
    """
    front = [i for i, (x, y) in enumerate(points)
             if not any(ox <= x and oy <= y and (ox < x or oy < y) for ox, oy in points)]
    return sorted(front, key=lambda i: points[i])


def _label_runs(runs: list[dict]) -> None:
    """Give each run a unique `label`: its name, plus what tells it apart from its namesakes.

    Namesakes are usually seeds of one recipe, or a gated run and its shrunk model.
    """
    groups = {}
    for run in runs:
        groups.setdefault(run["name"], []).append(run)
    used = set()
    for name, group in groups.items():
        for run in group:
            tags = [_tag(key, run[key]) for key in ("model_kind", "seed", *SEARCH_KEYS)
                    if len({str(other[key]) for other in group}) > 1]
            if len(group) > 1 and not tags:
                tags = [run["dir"].name]
            label = f"{name} [{' '.join(tags)}]" if tags else name
            unique, n = label, 2
            while unique in used:
                unique, n = f"{label} #{n}", n + 1
            used.add(unique)
            run["label"] = unique


# What a run's search weighed: runs of one recipe that differ in any of these were decoded
# differently, and are told apart in labels and never averaged together.
SEARCH_KEYS = ("lm_weight", "ctc_weight", "beam_size")
_SEARCH_TAGS = {"lm_weight": "LM", "ctc_weight": "CTC", "beam_size": "beam"}


def _tag(key: str, value) -> str:
    if key not in _SEARCH_TAGS:
        return str(value)
    return f"{_SEARCH_TAGS[key]} {'-' if value is None else format(value, 'g')}"


def _all_splits(runs: list[dict]) -> list[str]:
    return sorted({split for run in runs for split in run["splits"]})


def _note_missing_splits(runs: list[dict], splits: list[str]) -> None:
    """Note the splits that other runs have and this one lacks (a run with none has its note)."""
    for run in runs:
        if not _has_wer(run):
            continue
        for split in splits:
            if split not in run["splits"] or run["splits"][split]["wer"] is None:
                run["notes"].append(f"no {split} WER")


def _method_colours(runs: list[dict]) -> dict:
    methods = sorted({run["method"] for run in runs})
    return {method: PALETTE[i % len(PALETTE)] for i, method in enumerate(methods)}


def _rtf(run: dict, split: str):
    """The split's own RTF when it was measured, else the run's overall decode RTF."""
    rtf = run["splits"][split]["rtf"]
    return run["rtf"] if rtf is None else rtf


def _tradeoff_points(runs, split, x_of) -> list[tuple]:
    """(run, x, WER) for the runs that have both values for this split."""
    points = []
    for run in runs:
        wer = run["splits"].get(split, {}).get("wer")
        x = None if wer is None else x_of(run, split)
        if x is not None:
            points.append((run, x, wer))
    return points


def _gated_runs(runs: list[dict]) -> list[dict]:
    return [run for run in runs if run["history"] and any(e["gates"] for e in run["history"])]


def _gate_axes(epochs: list[dict]):
    """Layers and sites seen in any epoch, so that every epoch's grid has the same shape."""
    gates = [gate for epoch in epochs for gate in epoch["gates"]]
    layers = sorted({gate["layer"] for gate in gates})
    seen = {gate["site"] for gate in gates}
    sites = [site for site in SITES if site in seen] + sorted(seen - set(SITES))
    return layers, sites


def _gate_grid(gates: list[dict], layers, sites):
    """Fraction kept [layer][site] (None where no gate) and 'kept/units' cell labels."""
    cells = {(gate["layer"], gate["site"]): gate for gate in gates}
    fraction = [[None] * len(sites) for _ in layers]
    text = [[""] * len(sites) for _ in layers]
    for row, layer in enumerate(layers):
        for col, site in enumerate(sites):
            gate = cells.get((layer, site))
            if gate:
                fraction[row][col] = gate["kept"] / gate["units"]
                text[row][col] = f"{gate['kept']:g}/{gate['units']:g}"
    return fraction, text


def _line_style(i: int) -> tuple[str, str]:
    """Colour and dash of the i-th run's training curve, distinct for 40 runs."""
    return PALETTE[i % len(PALETTE)], DASHES[i // len(PALETTE) % len(DASHES)]


def _curve(run: dict, key: str):
    """Epochs and values of one history key, skipping epochs that lack it."""
    pairs = [(e["epoch"], e[key]) for e in run["history"] or [] if e[key] is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


# ---------------------------------------------------------------- across seeds


def seed_groups(runs: list[dict]) -> list[dict]:
    """The runs of one recipe (same name, model kind and search: SEARCH_KEYS) at two or more
    seeds, one group each: {name, method, model_kind, label, seeds, runs}. A comparison
    between methods is only as good as the spread of each across seeds; the dashboard shows
    both. Runs decoded with another LM weight, CTC weight or beam are another group, never
    averaged in."""
    groups = {}
    for run in runs:
        key = (run["name"], run["model_kind"], *(run[k] for k in SEARCH_KEYS))
        groups.setdefault(key, []).append(run)
    found = []
    for (name, model_kind, *search), members in groups.items():
        seeds = sorted({str(run["seed"]) for run in members})
        if len(seeds) < 2:
            continue
        namesakes = [r for r in runs if r["name"] == name]
        described = (("model_kind", model_kind), *zip(SEARCH_KEYS, search))
        tags = [_tag(key, value) for key, value in described
                if len({str(r[key]) for r in namesakes}) > 1]
        label = f"{name} [{' '.join(tags)}]" if tags else name
        found.append({"name": name, "method": members[0]["method"], "model_kind": model_kind,
                      "label": label, "seeds": seeds, "runs": members})
    return found


def spread(values) -> dict | None:
    """mean, sample standard deviation (0 for one value), min, max and n of the numbers."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
        if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": len(values)}


def _group_wer(group: dict, split: str):
    return spread(run["splits"].get(split, {}).get("wer") for run in group["runs"])


def _group_x(group: dict, split: str, x_of):
    """Mean x of the group's runs that have a WER and an x for this split, or None."""
    points = _tradeoff_points(group["runs"], split, x_of)
    return sum(x for _, x, _ in points) / len(points) if points else None


def _seed_row(group: dict, splits: list[str]) -> dict:
    row = {"recipe": group["label"], "method": group["method"], "seeds": len(group["seeds"]),
           "params_encoder": (spread(r["params"]["encoder"] for r in group["runs"]) or {})
           .get("mean")}
    for split in splits:
        wer = _group_wer(group, split)
        row[f"wer_{split}"] = (f"{wer['mean']:.2f} ± {wer['sd']:.2f} ({wer['n']})"
                               if wer else None)
        row[f"range_{split}"] = f"{wer['min']:.2f}-{wer['max']:.2f}" if wer else None
    return row


def separated_pairs(groups: list[dict], splits: list[str]) -> list[str]:
    """The claims `A < B` that the seeds support: every seed of A below every seed of B
    (their min-max ranges do not overlap), per split."""
    claims = []
    for split in splits:
        ranges = [(g["label"], _group_wer(g, split)) for g in groups]
        ranges = [(label, wer) for label, wer in ranges if wer and wer["n"] > 1]
        for label_a, a in ranges:
            for label_b, b in ranges:
                if a["max"] < b["min"]:
                    claims.append(f"{split}: {label_a} ({a['mean']:.2f}) below {label_b} "
                                  f"({b['mean']:.2f}) at every seed")
    return claims


def _seed_columns(splits: list[str]) -> dict:
    """Column name -> how to show it, as _columns does for the runs table."""
    columns = {"recipe": str, "method": str, "seeds": str, "params_encoder": _fmt_int}
    for split in splits:
        columns[f"wer_{split}"] = str
        columns[f"range_{split}"] = str
    return columns


def _claims_text(claims: list[str]) -> str:
    return ("Differences larger than the spread:" if claims else
            "No difference between recipes is larger than their spread across seeds.")


def _write_seeds(out_dir: Path, groups: list[dict], splits: list[str]) -> None:
    rows = [_seed_row(group, splits) for group in groups]
    columns = _seed_columns(splits)
    _write_csv(out_dir / "seeds.csv", rows, columns)
    claims = separated_pairs(groups, splits)
    _write_markdown(out_dir / "seeds.md", rows, columns, before=[SEEDS_NOTE, ""],
                    after=["", _claims_text(claims)] + [f"- {claim}" for claim in claims])


SEEDS_NOTE = ("WER cells: mean ± sample standard deviation (number of seeds); range: min-max "
              "over the seeds. In the figures, a diamond is a recipe's mean over its seeds and "
              "its bar spans min-max.")


# ---------------------------------------------------------------- table


def _columns(splits: list[str]) -> dict:
    """Column name -> how to show a value of the runs table (CSV keeps the raw value)."""
    columns = {"name": str, "method": str, "model_kind": str, "seed": str,
               "params_total": _fmt_int, "params_encoder": _fmt_int, "params_decoder": _fmt_int,
               "params_nonzero": _fmt_int, "params_encoder_nonzero": _fmt_int,
               "size_vs_target": "{:+.1%}".format}
    for split in splits:
        columns[f"wer_{split}"] = "{:.2f}".format
        columns[f"cer_{split}"] = "{:.2f}".format
    columns.update({"rtf": "{:.3f}".format, "flops_encoder_per_audio_second": "{:.3g}".format,
                    "kept_fraction": "{:.3f}".format, "polarised_fraction": "{:.3f}".format,
                    "notes": str, "run_dir": str})
    return columns


def _fmt_int(value) -> str:
    return f"{value:,.0f}"


def _row(run: dict, splits: list[str]) -> dict:
    """One run's table values; None where missing."""
    row = {"name": run["label"], "method": run["method"], "model_kind": run["model_kind"],
           "seed": run["seed"], "params_total": run["params"]["total"],
           "params_encoder": run["params"]["encoder"],
           "params_decoder": run["params"]["decoder"],
           "params_nonzero": run["params"]["nonzero"],
           "params_encoder_nonzero": run["params"]["encoder_nonzero"],
           "size_vs_target": _size_gap(run)}
    for split in splits:
        values = run["splits"].get(split, {})
        row[f"wer_{split}"] = values.get("wer")
        row[f"cer_{split}"] = values.get("cer")
    row.update({"rtf": run["rtf"], "flops_encoder_per_audio_second": run["flops"],
                "kept_fraction": run["kept_fraction"],
                "polarised_fraction": run["polarised_fraction"], "notes": "; ".join(run["notes"]),
                "run_dir": str(run["dir"])})
    return row


def _display(value, fmt) -> str:
    return "" if value is None or value == "" else fmt(value)


def _csv_value(value):
    """Whole numbers without '.0' (parameter counts), everything else as is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return "" if value is None else value


def _write_csv(path: Path, rows: list[dict], columns) -> None:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row[key]) for key in columns])


def _write_markdown(path: Path, rows: list[dict], columns, before=(), after=()) -> None:
    """The table, with lines of text `before` and `after` it."""
    def cell(text):
        return text.replace("|", "\\|")

    lines = [*before, "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (cell(_display(row[key], fmt)) for key, fmt in columns.items())
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join([*lines, *after]) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- PNG figures (matplotlib)


def _write_pngs(runs, splits, colours, out_dir: Path) -> list[str]:
    """All PNG views; returns their file names."""
    names = []
    for key, title, x_of in X_AXES:
        fig = _png_tradeoff(runs, splits, colours, title, x_of)
        if fig:
            names.append(_save(fig, out_dir, f"tradeoff_{key}.png"))
    used = set()
    for run in _gated_runs(runs):
        stem = _slug(run["label"])
        while stem in used:  # two labels can slug alike
            stem += "_"
        used.add(stem)
        names.append(_save(_png_gates(run), out_dir, f"gates_{stem}.png"))
        if _retention_epochs(run):
            names.append(_save(_png_retentions(run), out_dir, f"retentions_{stem}.png"))
    if any(run["history"] for run in runs):
        names.append(_save(_png_curves(runs), out_dir, "curves.png"))
    return names


def _save(fig: Figure, out_dir: Path, name: str) -> str:
    fig.savefig(out_dir / name, dpi=100)
    return name


def _png_tradeoff(runs, splits, colours, title, x_of):
    """WER against one x quantity, one panel per split; None when no run has both."""
    panels = [(split, _tradeoff_points(runs, split, x_of)) for split in splits]
    panels = [(split, points) for split, points in panels if points]
    if not panels:
        return None
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    for ax, (split, points) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for method in sorted({run["method"] for run, _, _ in points}):
            mine = [(x, wer) for run, x, wer in points if run["method"] == method]
            ax.scatter(*zip(*mine), color=colours[method], label=method, zorder=3)
        for group in seed_groups([run for run, _, _ in points]):
            wer, x = _group_wer(group, split), _group_x(group, split, x_of)
            ax.errorbar([x], [wer["mean"]], yerr=[[wer["mean"] - wer["min"]],
                                                  [wer["max"] - wer["mean"]]],
                        fmt="D", color=colours[group["method"]], capsize=4, markersize=8,
                        markeredgecolor="black", zorder=4)
        front = pareto_front([(x, wer) for _, x, wer in points])
        ax.step([points[i][1] for i in front], [points[i][2] for i in front], where="post",
                color="grey", linestyle=":", label="Pareto front")
        ax.scatter([points[i][1] for i in front], [points[i][2] for i in front], s=160,
                   facecolors="none", edgecolors="black", zorder=2)
        for run, x, wer in points:
            ax.annotate(run["label"], (x, wer), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ax.set(title=f"{split}: WER against {title.lower()}", xlabel=title, ylabel="WER (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _png_gates(run: dict) -> Figure:
    """Last epoch's fraction of kept units, layers down, sites across."""
    epoch = [e for e in run["history"] if e["gates"]][-1]
    layers, sites = _gate_axes([epoch])
    fraction, _ = _gate_grid(epoch["gates"], layers, sites)
    fig = Figure(figsize=(1.2 * len(sites) + 2.5, 0.4 * len(layers) + 1.5), layout="constrained")
    ax = fig.subplots()
    grid = [[math.nan if v is None else v for v in row] for row in fraction]
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for r, row in enumerate(fraction):
        for c, value in enumerate(row):
            if value is not None:
                # Dark text on the bright (high) end of viridis, light text elsewhere.
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_title(f"{run['label']}: fraction kept, epoch {epoch['epoch']:g}", fontsize=10)
    fig.colorbar(image, ax=ax, label="fraction kept")
    return fig


def _retention_epochs(run: dict) -> list[dict]:
    return [e for e in run["history"] or [] if e["retention_counts"]]


def _retention_grid(epochs: list[dict]):
    """Share of units per retention bin [bin][epoch], and the bins' labels (low to high)."""
    bins = max(len(e["retention_counts"]) for e in epochs)
    share = [[None] * len(epochs) for _ in range(bins)]
    for col, epoch in enumerate(epochs):
        counts = epoch["retention_counts"]
        if len(counts) == bins:  # an epoch logged with other bins is left blank
            total = sum(counts) or 1.0
            for row, count in enumerate(counts):
                share[row][col] = count / total
    labels = [f"{i / bins:.2f}-{(i + 1) / bins:.2f}" for i in range(bins)]
    return share, labels


def _png_retentions(run: dict) -> Figure:
    """Share of units per retention bin, epochs across: polarised runs fill the top and bottom."""
    epochs = _retention_epochs(run)
    share, labels = _retention_grid(epochs)
    fig = Figure(figsize=(0.6 * len(epochs) + 3.5, 4.0), layout="constrained")
    ax = fig.subplots()
    grid = [[math.nan if v is None else v for v in row] for row in share]
    image = ax.imshow(grid, cmap="magma", vmin=0, vmax=1, aspect="auto", origin="lower")
    ax.set_xticks(range(len(epochs)), [f"{e['epoch']:g}" for e in epochs])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="epoch", ylabel="retention p")
    last = epochs[-1]["polarised_fraction"]
    polarised = "" if last is None else f", polarised {100 * last:.0f}% at the end"
    ax.set_title(f"{run['label']}: units per retention bin{polarised}", fontsize=10)
    fig.colorbar(image, ax=ax, label="share of units")
    return fig


def _png_curves(runs: list[dict]) -> Figure:
    """One panel per history key, one line per run; the legend below the panels."""
    rows = math.ceil(len(CURVES) / 3)
    with_history = [run for run in runs if run["history"]]
    fig = Figure(figsize=(15, 4 * rows + 0.3 * math.ceil(len(with_history) / 4)),
                 layout="constrained")
    axes = fig.subplots(rows, 3).ravel()
    for ax in axes[len(CURVES):]:
        ax.axis("off")
    for ax, (key, title) in zip(axes, CURVES):
        for i, run in enumerate(with_history):
            colour, dash = _line_style(i)
            ax.plot(*_curve(run, key), marker=".", color=colour, linestyle=MPL_DASHES[dash],
                    label=run["label"])
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # A run may lack some keys, so gather one line per run from every panel.
    handles = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", fontsize=8,
                   ncol=min(4, len(handles)))
    return fig


# ---------------------------------------------------------------- interactive figures (plotly)


def _plotly_tradeoff(runs, split, colours):
    """WER on one split against every x quantity that some run has, picked with buttons."""
    fig = go.Figure()
    shown = []  # (title, first trace, end trace) per x quantity
    for _, title, x_of in X_AXES:
        points = _tradeoff_points(runs, split, x_of)
        if not points:
            continue
        start = len(fig.data)
        for method in sorted({run["method"] for run, _, _ in points}):
            mine = [(run, x, wer) for run, x, wer in points if run["method"] == method]
            fig.add_trace(go.Scatter(
                x=[x for _, x, _ in mine], y=[wer for _, _, wer in mine],
                text=[run["label"] for run, _, _ in mine], name=method, legendgroup=method,
                mode="markers+text", textposition="top center", textfont={"size": 10},
                marker={"color": colours[method], "size": 10},
                hovertemplate="%{text}<br>" + title + ": %{x:,.4g}<br>WER: %{y:.2f}%"
                              f"<extra>{html.escape(method)}</extra>"))
        for group in seed_groups([run for run, _, _ in points]):
            wer, x = _group_wer(group, split), _group_x(group, split, x_of)
            fig.add_trace(go.Scatter(
                x=[x], y=[wer["mean"]], name=f"{group['label']}: mean of {wer['n']} seeds",
                legendgroup=group["method"], mode="markers",
                marker={"color": colours[group["method"]], "size": 13, "symbol": "diamond",
                        "line": {"color": "black", "width": 1}},
                error_y={"type": "data", "symmetric": False,
                         "array": [wer["max"] - wer["mean"]],
                         "arrayminus": [wer["mean"] - wer["min"]]},
                hovertemplate=f"{html.escape(group['label'])}: mean of {wer['n']} seeds"
                              f"<br>WER %{{y:.2f}}% (min {wer['min']:.2f}, max "
                              f"{wer['max']:.2f})<extra></extra>"))
        front = [points[i] for i in pareto_front([(x, wer) for _, x, wer in points])]
        fig.add_trace(go.Scatter(
            x=[x for _, x, _ in front], y=[wer for _, _, wer in front], name="Pareto front",
            mode="lines+markers", line={"color": "grey", "dash": "dot", "shape": "hv"},
            marker={"symbol": "circle-open", "size": 18, "color": "black"},
            hoverinfo="skip"))
        shown.append((title, start, len(fig.data)))
    if not shown:
        return None
    buttons = [{"label": title, "method": "update",
                "args": [{"visible": [start <= i < end for i in range(len(fig.data))]},
                         {"xaxis.title.text": title}]}
               for title, start, end in shown]
    first_title, first_start, first_end = shown[0]
    for i, trace in enumerate(fig.data):
        trace.visible = first_start <= i < first_end
    # The title sits at the top edge and the buttons just above the plot, so they never meet.
    fig.update_layout(
        title={"text": f"{split}: WER against size and speed", "y": 0.98, "yanchor": "top"},
        height=540, xaxis_title=first_title, yaxis_title="WER (%)", template="plotly_white",
        updatemenus=[{"type": "buttons", "direction": "right", "buttons": buttons,
                      "x": 0, "xanchor": "left", "y": 1.03, "yanchor": "bottom"}]
        if len(shown) > 1 else [],
        margin={"t": 120})
    return fig


def _plotly_gates(run: dict):
    """Fraction kept per layer and site, with a slider over the epochs that logged gates."""
    epochs = [e for e in run["history"] if e["gates"]]
    layers, sites = _gate_axes(epochs)
    grids = [_gate_grid(e["gates"], layers, sites) for e in epochs]
    fraction, text = grids[-1]
    fig = go.Figure(go.Heatmap(
        z=fraction, text=text, x=sites, y=[f"layer {layer}" for layer in layers],
        zmin=0, zmax=1, colorscale="Viridis", texttemplate="%{text}",
        colorbar={"title": {"text": "kept"}},
        hovertemplate="%{y}, %{x}: %{z:.0%} kept (%{text})<extra></extra>"))
    fig.update_layout(title=f"{run['label']}: kept units per layer and site",
                      height=220 + 28 * len(layers), template="plotly_white",
                      yaxis={"autorange": "reversed"})
    if len(epochs) > 1:
        steps = [{"label": f"{e['epoch']:g}", "method": "restyle",
                  "args": [{"z": [epoch_fraction], "text": [epoch_text]}]}
                 for e, (epoch_fraction, epoch_text) in zip(epochs, grids)]
        fig.update_layout(sliders=[{"active": len(steps) - 1, "steps": steps,
                                    "currentvalue": {"prefix": "epoch "}, "pad": {"t": 40}}],
                          height=300 + 28 * len(layers))
    return fig


def _plotly_retentions(run: dict):
    """Share of units per retention bin, epochs across."""
    epochs = _retention_epochs(run)
    share, labels = _retention_grid(epochs)
    fig = go.Figure(go.Heatmap(
        z=share, x=[f"{e['epoch']:g}" for e in epochs], y=labels, zmin=0, zmax=1,
        colorscale="Magma", colorbar={"title": {"text": "share"}},
        hovertemplate="epoch %{x}, p in %{y}: %{z:.1%} of units<extra></extra>"))
    fig.update_layout(title=f"{run['label']}: units per retention bin",
                      xaxis={"title": {"text": "epoch"}, "type": "category"},
                      yaxis={"title": {"text": "retention p"}},
                      height=420, template="plotly_white")
    return fig


def _plotly_curves(runs: list[dict]):
    fig = make_subplots(rows=math.ceil(len(CURVES) / 3), cols=3,
                        subplot_titles=[title for _, title in CURVES],
                        horizontal_spacing=0.07, vertical_spacing=0.15)
    in_legend = set()
    for i, run in enumerate(run for run in runs if run["history"]):
        for panel, (key, _) in enumerate(CURVES):
            epochs, values = _curve(run, key)
            if not epochs:
                continue
            colour, dash = _line_style(i)
            fig.add_trace(go.Scatter(
                x=epochs, y=values, name=run["label"], legendgroup=run["label"],
                showlegend=run["label"] not in in_legend, mode="lines+markers",
                line={"color": colour, "dash": dash}),
                row=panel // 3 + 1, col=panel % 3 + 1)
            in_legend.add(run["label"])
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=350 * math.ceil(len(CURVES) / 3), template="plotly_white",
                      title="Training curves")
    return fig


# ---------------------------------------------------------------- page


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
.note { color: #8a5300; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
td.text, th { text-align: left; }
td { white-space: nowrap; }
th { background: #f3f3f3; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[data-order=asc]::after { content: " \\25B2"; }
th[data-order=desc]::after { content: " \\25BC"; }
.scroll { overflow-x: auto; }
"""

# Click a header to sort by that column; numbers sort as numbers, empty cells go last.
SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var asc = th.dataset.order !== "asc";
    th.parentNode.querySelectorAll("th").forEach(function (h) { delete h.dataset.order; });
    th.dataset.order = asc ? "asc" : "desc";
    var rows = Array.from(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      var nx = Number(x), ny = Number(y);
      var order = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
      return asc ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def _page(runs, splits, colours, pngs, rows, columns) -> str:
    sections = [
        ("notes", "Notes", _notes_html(runs)),
        ("tradeoff", "WER against size and speed", _tradeoff_html(runs, splits, colours)),
        ("gates", "Kept units per layer and site", _gates_html(runs)),
        ("curves", "Training curves", _curves_html(runs)),
        ("seeds", "Across seeds", _seeds_html(runs, splits)),
        ("table", "Runs", _table_html(rows, columns)),
        ("files", "Files", _files_html(pngs)),
    ]
    nav = " · ".join(f'<a href="#{anchor}">{title}</a>' for anchor, title, _ in sections)
    body = "\n".join(f'<section id="{anchor}"><h2>{title}</h2>\n{content}\n</section>'
                     for anchor, title, content in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>conformer-prune report</title>
<style>{STYLE}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>
</head>
<body>
<h1>conformer-prune report</h1>
<p>{len(runs)} run{'s' if len(runs) != 1 else ''}, methods:
{', '.join(html.escape(m) for m in colours)}. {nav}</p>
{body}
<script>{SORT_JS}</script>
</body>
</html>
"""


def _figure_html(fig) -> str:
    # plotly.js is inlined once in <head>, so each figure brings only its data.
    return fig.to_html(full_html=False, include_plotlyjs=False)


def _note_html(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _notes_html(runs) -> str:
    items = [f"<li><b>{html.escape(run['label'])}</b>: {html.escape(note)}</li>"
             for run in runs for note in run["notes"]]
    return f"<ul>{''.join(items)}</ul>" if items else "<p>Every run has every field.</p>"


def _tradeoff_html(runs, splits, colours) -> str:
    figures = [fig for fig in (_plotly_tradeoff(runs, split, colours) for split in splits) if fig]
    if not figures:
        return _note_html("No run has both a WER and a parameter count, FLOPs or RTF.")
    intro = ("<p>Circled points, joined by the dotted line, are the Pareto front: no other run "
             "has both fewer (parameters, FLOPs, RTF) and a lower WER. The buttons switch the "
             "x axis.</p>")
    return intro + "\n".join(_figure_html(fig) for fig in figures)


def _gates_html(runs) -> str:
    gated = _gated_runs(runs)
    if not gated:
        return _note_html("No run has gates in history.jsonl.")
    intro = ("<p>Fraction of units kept (gate retention above threshold), cell text "
             "kept/units. The slider picks the epoch; it starts at the last. Below each, the "
             "retention histogram per epoch: polarised gates fill its top and bottom rows.</p>")
    figures = []
    for run in gated:
        figures.append(_plotly_gates(run))
        if _retention_epochs(run):
            figures.append(_plotly_retentions(run))
    return intro + "\n".join(_figure_html(fig) for fig in figures)


def _curves_html(runs) -> str:
    if not any(run["history"] for run in runs):
        return _note_html("No run has a history.jsonl.")
    return _figure_html(_plotly_curves(runs))


def _table_html(rows, columns, stem="runs") -> str:
    head = "".join(f"<th>{html.escape(key)}</th>" for key in columns)
    body = []
    for row in rows:
        cells = []
        for key, fmt in columns.items():
            value = row[key]
            sort = "" if value is None else str(value)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            kind = "" if number else ' class="text"'
            cells.append(f'<td{kind} data-sort="{html.escape(sort)}">'
                         f"{html.escape(_display(value, fmt))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<p>Click a column header to sort. Also in <a href="{stem}.csv">{stem}.csv</a> and '
            f'<a href="{stem}.md">{stem}.md</a>.</p>'
            f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _seeds_html(runs, splits) -> str:
    groups = seed_groups(runs)
    if not groups:
        return _note_html("No recipe has runs at two or more seeds.")
    rows = [_seed_row(group, splits) for group in groups]
    claims = separated_pairs(groups, splits)
    listing = ("<ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in claims) + "</ul>"
               if claims else "")
    return (f"<p>{html.escape(SEEDS_NOTE)}</p>"
            + _table_html(rows, _seed_columns(splits), stem="seeds")
            + f"<p>{html.escape(_claims_text(claims))}</p>{listing}")


def _files_html(pngs) -> str:
    links = "".join(f'<li><a href="{html.escape(name)}">{html.escape(name)}</a></li>'
                    for name in pngs)
    return f"<p>The same views as PNG (matplotlib):</p><ul>{links}</ul>"


# ---------------------------------------------------------------- entry points


def write_report(run_dirs, out_dir) -> Path:
    """Write the dashboard, PNGs, runs.csv and runs.md into out_dir; return index.html's path."""
    runs = [load_run(run_dir) for run_dir in find_run_dirs(run_dirs)]
    _label_runs(runs)
    splits = _all_splits(runs)
    _note_missing_splits(runs, splits)
    colours = _method_colours(runs)
    columns = _columns(splits)
    rows = [_row(run, splits) for run in runs]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = _write_pngs(runs, splits, colours, out_dir)
    _write_csv(out_dir / "runs.csv", rows, columns)
    _write_markdown(out_dir / "runs.md", rows, columns)
    groups = seed_groups(runs)
    if groups:
        _write_seeds(out_dir, groups, splits)
    index = out_dir / "index.html"
    index.write_text(_page(runs, splits, colours, pngs, rows, columns), encoding="utf-8")
    return index


def add_parser(subparsers) -> None:
    """Add the `report` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "report", help="dashboard comparing runs: WER against size, gates, training curves",
        description="Read results.json and history.jsonl of run folders (or folders holding "
                    "run folders, searched recursively) and write index.html, PNG figures, "
                    "runs.csv and runs.md into --out.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run folder, or a folder with run folders below it")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder (created if missing)")
    parser.set_defaults(func=run)


def run(args) -> int:
    try:
        index = write_report(args.run_dirs, args.out)
    except ReportError as err:
        print(f"conformer-prune report: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {index}")
    return 0
