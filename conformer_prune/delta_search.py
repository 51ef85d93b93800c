"""Choosing DAREx-q's rescaling divisor q (METHODS.md section 3), and the delta sweep.

DARE divides the kept delta entries by 1 - p; at high drop rates that over-amplifies them and
the rebuilt variant breaks. DAREx-q divides by a q chosen for the variant, three ways:

- `dev`: one global q, the one with the lowest WER on a small labelled dev set (every
  `dev_every`-th utterance of the domain's dev split), over a geometric grid from 1 - p to 1;
- `unlabelled`: one global q, the one whose pruned variant changes the last encoder layer's
  outputs least against the unpruned variant, on a few utterances whose transcripts are not
  used, over a finer grid;
- `analytic`: one q per linear layer from delta.analytic_q, which needs each layer's mean
  input (measured on the same utterances) and a balance `eta`; eta is chosen by the
  unlabelled criterion over ETA_GRID, as the authors choose it by a criterion.

Every choice uses the masks of the first seed; the chosen q is then used for every seed.

`sweep` runs the whole evaluation of docs/DELTA.md: for each drop rate, method and mask seed,
the rebuilt variant's WER on the domain's test split and on the base's test-clean, with the
delta's bytes, one JSON per point so that a killed sweep resumes where it stopped.
"""

import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from conformer_prune.delta import (
    delta_of,
    layer_qs,
    make_delta,
    prune_delta,
    rebuild,
    stored_bytes,
)
from conformer_prune.errors import InputError
from conformer_prune.scoring import read_results, write_results

logger = logging.getLogger(__name__)

Q_SEARCHES = ("dev", "unlabelled", "analytic")
DEV_GRID_POINTS = 7  # each point decodes the dev subset: the costly search
UNLABELLED_GRID_POINTS = 41  # each point is an encoder pass over the probe utterances
ETA_GRID = tuple(10.0 ** k for k in range(-1, 7))
SWEEP_METHODS = ("dare", "darex_q_dev", "darex_q_unlabelled", "darex_q_analytic", "magnitude")


def q_grid(drop, points):
    """`points` q values from 1 - p (DARE) to 1 (no rescaling), evenly spaced in log q."""
    low = 1.0 - drop
    return [low ** (1.0 - i / (points - 1)) for i in range(points)]


class EncoderProbe:
    """A few utterances' features, and what the model's encoder makes of them: the unlabelled
    criterion and the mean inputs of the linear layers (analytic q). One utterance per pass,
    so that no padding enters a mean."""

    def __init__(self, decoder, dataset, utterances=32):
        self.model = decoder.model
        self.feats = []
        compute, normalize = decoder.asr.hparams.compute_features, decoder.asr.hparams.normalize
        normalize.eval()
        # Spread over the split (it is sorted by duration), not its shortest utterances.
        picked = range(0, len(dataset), max(1, len(dataset) // max(1, utterances)))
        with torch.no_grad():
            for i in list(picked)[:utterances]:
                wav = dataset[i]["sig"].unsqueeze(0)
                self.feats.append(normalize(compute(wav), torch.ones(1)))
        if not self.feats:
            raise InputError("the probe split has no utterances")
        self.reference = self.encoder_outputs()

    @torch.no_grad()
    def encoder_outputs(self):
        self.model.eval()
        outputs = []
        for feats in self.feats:
            src = self.model["CNN"](feats)
            outputs.append(self.model["Transformer"].encode(src, torch.ones(1)))
        return outputs

    def change(self):
        """Mean squared change of the encoder outputs against the reference (the unpruned
        variant's), relative to the reference's mean square."""
        outputs = self.encoder_outputs()
        num = sum(float(((o - r) ** 2).mean()) for o, r in zip(outputs, self.reference))
        den = sum(float((r ** 2).mean()) for r in self.reference)
        return num / den

    @torch.no_grad()
    def mean_inputs(self):
        """{linear module name: mean input vector} over every frame of the probe utterances,
        for the linear layers that the encoder pass and the CTC head use."""
        sums, counts, hooks = {}, {}, []

        def hook_for(name):
            def hook(module, inputs, output):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
                sums[name] = sums.get(name, 0) + x.sum(dim=0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            return hook

        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear):
                hooks.append(module.register_forward_hook(hook_for(name)))
        try:
            for out in self.encoder_outputs():
                self.model["ctc_lin"](out)
        finally:
            for handle in hooks:
                handle.remove()
        return {name: (sums[name] / counts[name]).to(torch.float32) for name in sums}


class VariantLab:
    """The unpruned variant loaded once; variants of it (base + pruned delta) swapped in and
    measured: WER on datasets, output change on the probe."""

    def __init__(self, decoder, base_state, probe=None):
        self.decoder, self.probe = decoder, probe
        self.finetuned = {k: v.clone() for k, v in decoder.model.state_dict().items()}
        if base_state.keys() != self.finetuned.keys():
            raise InputError("the base run's tensors differ from the variant's; was the "
                             "variant fine-tuned from this base?")
        self.base = base_state
        self.delta = delta_of(base_state, self.finetuned)

    def load(self, state):
        self.decoder.model.load_state_dict(state)

    def load_pruned(self, method, drop, q=None, seed=0):
        """Loads base + pruned delta; returns the pruned delta."""
        pruned = prune_delta(self.delta, method, drop, q, seed)
        self.load(rebuild(self.base, pruned))
        return pruned

    def wer(self, datasets):
        splits, _ = self.decoder.score(datasets)
        return {split: round(result["wer"], 2) for split, result in splits.items()}


def choose_q(lab, search, drop, seed, dev_sets=None):
    """(q, record): q a number (`dev`, `unlabelled`) or {key: q} (`analytic`); the record
    lists every candidate tried with its criterion value."""
    started = time.perf_counter()
    if search == "dev":
        tried = []
        for q in q_grid(drop, DEV_GRID_POINTS):
            lab.load_pruned("darex_q", drop, q, seed)
            tried.append({"q": q, "dev_wer": lab.wer(dev_sets)})
        best = min(tried, key=lambda t: (sum(t["dev_wer"].values()), -t["q"]))
        chosen = best["q"]
    elif search == "unlabelled":
        tried = []
        for q in q_grid(drop, UNLABELLED_GRID_POINTS):
            lab.load_pruned("darex_q", drop, q, seed)
            tried.append({"q": q, "output_change": lab.probe.change()})
        chosen = min(tried, key=lambda t: t["output_change"])["q"]
    elif search == "analytic":
        lab.load(lab.finetuned)
        mean_inputs = lab.probe.mean_inputs()
        tried, per_eta = [], {}
        for eta in ETA_GRID:
            qs = layer_qs(lab.delta, mean_inputs, drop, eta)
            lab.load_pruned("darex_q", drop, qs, seed)
            per_eta[eta] = qs
            tried.append({"eta": eta, "output_change": lab.probe.change(),
                          "q_mean": sum(qs.values()) / len(qs),
                          "q_min": min(qs.values()), "q_max": max(qs.values())})
        chosen = per_eta[min(tried, key=lambda t: t["output_change"])["eta"]]
    else:
        raise InputError(f"q search {search!r}: expected one of {', '.join(Q_SEARCHES)}")
    return chosen, {"search": search, "drop": drop, "mask_seed": seed, "q": chosen,
                    "tried": tried, "seconds": round(time.perf_counter() - started, 1)}


# ----- the sweep -----------------------------------------------------------------------------


def _point_name(method, drop, seed):
    return f"{method}_p{drop:g}_s{seed}.json"


def _write_json(path, data):
    """scoring.write_results (atomic), into a folder made on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_results(path, data)


def sweep(base_run, finetuned_run, out_dir, data_folder, base_data_folder, drops, methods,
          seeds, base_test_seeds=(0,), test_split="test-clean", dev_split="dev-clean",
          dev_every=2, probe_utterances=32, batch_size=16):
    """Evaluates pruned deltas of FINETUNED against BASE; writes out_dir/points/*.json (one per
    method, drop rate and seed; existing ones are kept: a rerun resumes), out_dir/q/*.json
    (how each q was chosen) and out_dir/reference.json (base and unpruned variant)."""
    unknown = sorted(set(methods) - set(SWEEP_METHODS))
    if unknown:
        raise InputError(f"sweep methods {unknown}: expected some of {', '.join(SWEEP_METHODS)}")
    if not drops or not seeds:
        raise InputError("delta sweep: give at least one drop rate and one mask seed")
    out_dir = Path(out_dir)
    unpruned = out_dir / "unpruned"
    if not (unpruned / "model" / "hyperparams.yaml").exists():
        _export_unpruned(base_run, finetuned_run, unpruned)
    # Sweeps of other methods may run beside this one on the same folder: each prepares its
    # own CSVs, and writes only its own points and q files.
    scratch = Path(tempfile.mkdtemp(prefix="sweep-", dir=out_dir))
    lab, dev = open_lab(base_run, unpruned / "model", scratch, data_folder, dev_split,
                        dev_every, probe_utterances, batch_size)
    domain = lab.decoder.datasets(data_folder, [test_split], scratch / "domain")
    base_domain = lab.decoder.datasets(base_data_folder, [test_split], scratch / "base")
    # The full checkpoint a variant would ship without a delta: the unpruned variant's file.
    full_bytes = (unpruned / "model" / "model.ckpt").stat().st_size

    def both_wers():
        return {"domain": lab.wer(domain)[test_split], "base": lab.wer(base_domain)[test_split]}

    for drop in drops:
        for method in methods:
            for seed in (seeds if method != "magnitude" else seeds[:1]):
                point = out_dir / "points" / _point_name(method, drop, seed)
                if point.exists():
                    continue
                q, q_record = _q_for(lab, method, drop, seeds[0], dev, out_dir)
                started = time.perf_counter()
                pruned = lab.load_pruned(_delta_method(method), drop, q, seed)
                wers = both_wers() if seed in base_test_seeds else {
                    "domain": lab.wer(domain)[test_split], "base": None}
                _write_json(point, {
                    "method": method, "drop": drop, "seed": seed, "wer": wers,
                    "bytes": stored_bytes(pruned), "full_checkpoint_bytes": full_bytes,
                    "nonzero": sum(int(torch.count_nonzero(d)) for d in pruned.values()),
                    "q": q_record, "seconds": round(time.perf_counter() - started, 1)})
                logger.info("delta sweep: %s p=%g seed %d: domain WER %s, base WER %s",
                            method, drop, seed, wers["domain"], wers["base"])
    # Last, so that sweeps of other methods into the same folder, run side by side, do not
    # all score the references at once: the first to finish does.
    reference_file = out_dir / "reference.json"
    if not reference_file.exists():
        lab.load(lab.finetuned)
        finetuned = both_wers()
        lab.load(lab.base)
        base = both_wers()
        _write_json(reference_file, {
            "base_run": str(base_run), "finetuned_run": str(finetuned_run),
            "data_folder": str(data_folder), "base_data_folder": str(base_data_folder),
            "test_split": test_split, "full_checkpoint_bytes": full_bytes,
            "delta_entries": sum(d.numel() for d in lab.delta.values()),
            "finetuned": finetuned, "base": base})
    shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def _export_unpruned(base_run, finetuned_run, folder):
    """The unpruned variant (base + whole delta) as a delta folder with its model/, written
    aside and renamed into place, so that two sweeps starting together cannot mix files."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix="unpruned-", dir=folder.parent))
    make_delta(base_run, finetuned_run, aside, "dare", 0.0)
    try:
        aside.rename(folder)
    except OSError:  # the other sweep was first: same files
        shutil.rmtree(aside, ignore_errors=True)


def _delta_method(method):
    """The delta.prune_delta method of a sweep method (the darex_q_* differ in q only)."""
    return "darex_q" if method.startswith("darex_q_") else method


def _q_for(lab, method, drop, seed, dev_sets, out_dir):
    """The q of a sweep method at one drop rate, chosen once and kept in out_dir/q/."""
    if not method.startswith("darex_q_"):
        return None, None
    search = method[len("darex_q_"):]
    path = out_dir / "q" / f"{method}_p{drop:g}.json"
    record = read_results(path, missing_ok=True)
    if not record:
        _, record = choose_q(lab, search, drop, seed, dev_sets)
        _write_json(path, record)
    return record["q"], {k: v for k, v in record.items() if k != "tried"}


def open_lab(base_run, model_dir, scratch, data_folder, dev_split="dev-clean", dev_every=2,
             probe_utterances=32, batch_size=16):
    """(lab, dev datasets): the unpruned variant's inference folder `model_dir` loaded once
    against the base run's weights, with the probe on the domain's dev subset; CSVs and
    decode files go under `scratch`."""
    from conformer_prune.decode import FolderDecoder
    from conformer_prune.shrink import load_gated_run

    scratch = Path(scratch)
    decoder = FolderDecoder(model_dir, batch_size=batch_size, output_folder=scratch / "decode")
    dev = decoder.datasets(data_folder, [dev_split], scratch / "domain", every=dev_every)
    lab = VariantLab(decoder, load_gated_run(base_run)["modules"].state_dict(),
                     EncoderProbe(decoder, dev[dev_split], probe_utterances))
    return lab, dev


def search_q(base_run, finetuned_run, search, drop, seed, data_folder, dev_split="dev-clean",
             dev_every=2, probe_utterances=32):
    """`conformer-prune delta make --q-search`: (q, record) for one variant and drop rate, the
    unpruned variant exported to a temporary inference folder for the search."""
    with tempfile.TemporaryDirectory(prefix="delta-q-") as tmp:
        make_delta(base_run, finetuned_run, Path(tmp) / "unpruned", "dare", 0.0)
        lab, dev = open_lab(base_run, Path(tmp) / "unpruned" / "model", tmp, data_folder,
                            dev_split, dev_every, probe_utterances)
        return choose_q(lab, search, drop, seed, dev)
