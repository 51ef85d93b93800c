"""`conformer-prune delta report`: the delta sweeps' dashboard (docs/DELTA.md).

Reads one or more sweep folders (`conformer-prune delta sweep --out DIR`; each folder is one
fine-tuned variant, labelled by its folder name) and writes:

- delta.md / delta.csv: one row per variant, method and drop rate: the domain test WER as
  mean, min and max over the mask seeds (with their number), the share of the fine-tuning's
  gain it keeps (gain_kept), the base test WER (the seeds scored on it), the stored delta's
  bytes and how many times smaller than the full checkpoint it is, and the q used;
- delta_wer_vs_bytes.png: domain WER (mean over seeds, min-max bar) and base WER against the
  delta's bytes, per variant and method, beside the unpruned variants and the base model;
- index.html: both, on one page.
"""

import csv
import html
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the headless backend)

from conformer_prune.errors import InputError  # noqa: E402

COLUMNS = ("variant", "method", "drop", "seeds", "domain_wer", "domain_min", "domain_max",
           "gain_kept", "base_wer", "bytes", "times_smaller", "q")


TABLE_NOTE = (
    "domain_wer: mean over the mask seeds (min, max beside it); gain_kept: the share of the "
    "fine-tuning's domain gain kept; base_wer: the first seed; bytes: the delta as bitmask + "
    "values, every method alike (`delta make` stores a dare or darex_q delta without its "
    "bitmask: docs/DELTA.md); times_smaller: the full checkpoint over bytes; q: the global q, "
    "or the mean of the per-layer qs.")


def load_sweep(folder):
    """(reference, points) of one sweep folder."""
    folder = Path(folder)
    reference_file = folder / "reference.json"
    if not reference_file.exists():
        raise InputError(f"{reference_file}: missing; expected a folder written by "
                         "`conformer-prune delta sweep`")
    reference = json.loads(reference_file.read_text(encoding="utf-8"))
    points = [json.loads(p.read_text(encoding="utf-8"))
              for p in sorted((folder / "points").glob("*.json"))]
    return reference, points


def summarise(folders):
    """Rows (one per variant, method and drop rate) and the references by variant."""
    rows, references = [], {}
    for folder in folders:
        variant = Path(folder).name
        reference, points = load_sweep(folder)
        references[variant] = reference
        groups = {}
        for point in points:
            groups.setdefault((point["method"], point["drop"]), []).append(point)
        for (method, drop), group in sorted(groups.items()):
            domain = [p["wer"]["domain"] for p in group]
            base = [p["wer"]["base"] for p in group if p["wer"]["base"] is not None]
            q = group[0]["q"]["q"] if group[0].get("q") else None
            rows.append({
                "variant": variant, "method": method, "drop": drop, "seeds": len(group),
                "domain_wer": statistics.mean(domain), "domain_min": min(domain),
                "domain_max": max(domain),
                "gain_kept": gain_kept(reference, statistics.mean(domain)),
                "base_wer": statistics.mean(base) if base else None,
                "bytes": round(statistics.mean(p["bytes"] for p in group)),
                "times_smaller": reference["full_checkpoint_bytes"]
                / statistics.mean(p["bytes"] for p in group),
                "q": (sum(q.values()) / len(q)) if isinstance(q, dict) else q,
            })
    return rows, references


def gain_kept(reference, wer):
    """The share of what fine-tuning gained on the domain (base model's WER minus the unpruned
    variant's) that a pruned variant keeps: 1 all of it, 0 none (back to the base model's WER),
    negative worse than the base model."""
    gained = reference["base"]["domain"] - reference["finetuned"]["domain"]
    return (reference["base"]["domain"] - wer) / gained if gained else None


def _cell(column, value):
    if value is None:
        return ""
    if column in ("domain_wer", "domain_min", "domain_max", "base_wer"):
        return f"{value:.2f}"
    if column == "times_smaller":
        return f"{value:.1f}"
    if column == "gain_kept":
        return f"{100 * value:.0f}%"
    if column == "q":
        return f"{value:.4f}"
    if column == "bytes":
        return f"{value:,}"
    return str(value)


def _markdown(rows, references):
    lines = []
    for variant, ref in references.items():
        lines.append(f"- `{variant}`: unpruned variant {ref['finetuned']['domain']:.2f} "
                     f"(domain) / {ref['finetuned']['base']:.2f} (base); base model "
                     f"{ref['base']['domain']:.2f} / {ref['base']['base']:.2f}; full checkpoint "
                     f"{ref['full_checkpoint_bytes']:,} bytes ({ref['finetuned_run']})")
    lines += ["", TABLE_NOTE]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


VARIANT_STYLES = ("-", "--", ":", "-.")


def _figure(rows, references):
    """Two panels, domain WER and base WER against the delta's bytes (log scale). Colour: the
    method; line style: the variant. The methods at one drop rate store about the same bytes,
    so each series is nudged sideways a little to keep the bars apart; the ticks name p."""
    fig = Figure(figsize=(13, 5.5))
    axes = fig.subplots(1, 2)
    methods = sorted({row["method"] for row in rows})
    variants = list(references)
    series = {}
    for row in rows:
        series.setdefault((row["variant"], row["method"]), []).append(row)
    for i, ((variant, method), group) in enumerate(sorted(series.items())):
        group.sort(key=lambda r: r["bytes"])
        nudge = 1.0 + 0.025 * (i - (len(series) - 1) / 2)
        style = {"color": f"C{methods.index(method)}", "capsize": 3, "marker": "o",
                 "linestyle": VARIANT_STYLES[variants.index(variant) % len(VARIANT_STYLES)],
                 "label": f"{method} ({variant})"}
        x = [r["bytes"] / 1e6 * nudge for r in group]
        y = [r["domain_wer"] for r in group]
        err = [[r["domain_wer"] - r["domain_min"] for r in group],
               [r["domain_max"] - r["domain_wer"] for r in group]]
        axes[0].errorbar(x, y, yerr=err, **style)
        based = [(xi, r["base_wer"]) for xi, r in zip(x, group) if r["base_wer"] is not None]
        if based:
            axes[1].plot(*zip(*based), **{k: v for k, v in style.items() if k != "capsize"})
    first = next(iter(references.values()))
    for ax, key, title in ((axes[0], "domain", "the domain's"), (axes[1], "base", "the base's")):
        for variant, ref in references.items():
            ax.axhline(ref["finetuned"][key], color="grey", lw=1,
                       ls=VARIANT_STYLES[variants.index(variant) % len(VARIANT_STYLES)],
                       label=f"unpruned ({variant})")
        ax.axhline(first["base"][key], color="k", lw=1.5, ls=(0, (1, 3)), label="base model")
        ticks = {}
        for row in rows:
            ticks.setdefault(row["drop"], []).append(row["bytes"] / 1e6)
        ax.set_xscale("log")
        ax.set_xticks([sum(v) / len(v) for v in ticks.values()],
                      [f"p={p:g}\n{sum(v) / len(v):.2f} MB" for p, v in ticks.items()])
        ax.minorticks_off()
        ax.set_xlabel("stored delta (bitmask + values; log scale)")
        ax.set_ylabel(f"WER on {title} {first['test_split']} (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("Domain: mean over mask seeds, bars min-max")
    axes[1].set_title("Base domain (forgetting): first mask seed")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def write_delta_report(folders, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, references = summarise(folders)
    if not rows:
        raise InputError(f"{', '.join(map(str, folders))}: no sweep points yet")
    markdown = _markdown(rows, references)
    (out_dir / "delta.md").write_text(markdown, encoding="utf-8")
    with open(out_dir / "delta.csv", "w", newline="", encoding="utf-8") as fout:
        writer = csv.DictWriter(fout, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    _figure(rows, references).savefig(out_dir / "delta_wer_vs_bytes.png", dpi=120)
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(c, row[c]))}</td>" for c in COLUMNS) + "</tr>"
        for row in rows)
    (out_dir / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>conformer-prune: pruned deltas</title>"
        "<h1>Pruned deltas</h1><img src=delta_wer_vs_bytes.png alt='WER against delta size'>"
        "<p>Domain WER: mean over mask seeds (min, max). Base WER: the base's test split, "
        "the seeds scored on it. See delta.md for the references.</p><table border=1>"
        "<tr>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>" + table + "</table>",
        encoding="utf-8")
    return out_dir
