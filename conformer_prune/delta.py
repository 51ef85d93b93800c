"""Fine-tuned variants stored as pruned deltas: DARE, DAREx-q and magnitude (METHODS.md section 3).

A variant fine-tuned from a base model is `W_ft = W_base + D`. Delta-parameter pruning keeps a
fraction of D and rescales it, so that the variant ships as a sparse delta:

- DARE (Yu et al. 2024): per tensor, drop each entry with probability p (a Bernoulli mask drawn
  from a seeded generator), rescale the survivors by 1 / (1 - p): `D' = (1 - m) D / (1 - p)`,
  which keeps the expected value of every entry.
- DAREx-q (Deng et al. 2025): the same mask, survivors divided by q instead of 1 - p
  (q = 1 - p is DARE); q is one number or one per tensor. `analytic_q` is the authors'
  per-layer formula; choosing q by dev WER or by an unlabelled criterion needs a model and
  data, and lives in delta_search.py.
- magnitude: per tensor, keep the largest `round((1 - p) n)` entries of |D|, no rescaling.

Which tensors: every floating-point tensor of the model's state dict that the fine-tuning
changed (the caller passes both state dicts); an unchanged tensor has a zero delta and costs
only its bitmask. A DARE or DAREx-q delta is stored as its kept values alone (its masks come
back from the seed: `encode_seeded`), a magnitude delta as bitmask + values
(`model.encode_sparse`), with the settings and mask seed in `delta.json`; `rebuild` adds it
back to the base.
"""

import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from conformer_prune.errors import InputError
from conformer_prune.model import decode_sparse, encode_sparse

DELTA_FILE, DELTA_INFO = "delta.ckpt", "delta.json"
SEEDED_FORMAT = "seeded_mask"
METHODS = ("dare", "darex_q", "magnitude")
RANDOM_MASK_METHODS = ("dare", "darex_q")  # their masks come back from the seed


def delta_of(base, finetuned):
    """{key: W_ft - W_base} for the floating-point tensors; keys and shapes must agree."""
    if base.keys() != finetuned.keys():
        missing = sorted(base.keys() ^ finetuned.keys())[:3]
        raise InputError(f"base and fine-tuned models have different tensors (e.g. {missing}); "
                         "was the variant fine-tuned from this base?")
    delta = {}
    for key, tensor in finetuned.items():
        if tensor.shape != base[key].shape:
            raise InputError(f"tensor {key!r}: fine-tuned shape {tuple(tensor.shape)}, base "
                             f"{tuple(base[key].shape)}; not a variant of this base")
        if tensor.is_floating_point():
            delta[key] = tensor - base[key]
    return delta


def prune_delta(delta, method, drop, q=None, seed=0):
    """The pruned and rescaled delta. `drop` is the drop rate p in [0, 1); `q` the DAREx
    rescaling divisor: None (DARE's 1 - p), one number, or {key: q} for every tensor; `seed`
    draws the random masks (one generator, tensors in key order, so the same seed gives the
    same masks whatever q is)."""
    if method not in METHODS:
        raise InputError(f"delta method {method!r}: expected one of {', '.join(METHODS)}")
    if not 0.0 <= drop < 1.0:
        raise InputError(f"drop rate {drop!r}: expected p in [0, 1)")
    if method == "magnitude":
        return {key: _keep_largest(d, drop) for key, d in delta.items()}
    divisors = _divisors(delta, drop, None if method == "dare" else q)
    masks = random_masks({key: d.shape for key, d in delta.items()}, drop, seed)
    return {key: torch.where(masks[key], d / divisors[key], torch.zeros_like(d))
            for key, d in delta.items()}


def random_masks(shapes, drop, seed):
    """{key: keep mask} of DARE and DAREx-q: each entry kept with probability 1 - p, from one
    generator seeded with `seed`, tensors in key order (so that the seed alone gives them back,
    which is what the seeded storage relies on)."""
    generator = torch.Generator().manual_seed(seed)
    masks = {key: torch.rand(tuple(shapes[key]), generator=generator) >= drop
             for key in sorted(shapes)}
    return {key: masks[key] for key in shapes}


def _divisors(delta, drop, q):
    """{key: q} from None (1 - p), a number, or a mapping that covers every tensor."""
    if q is None:
        q = 1.0 - drop
    divisors = dict(q) if isinstance(q, dict) else dict.fromkeys(delta, q)
    missing = sorted(set(delta) - set(divisors))
    if missing:
        raise InputError(f"q given per tensor but not for {missing[:3]}")
    for key, value in divisors.items():
        if not 0.0 < float(value) <= 1.0:
            raise InputError(f"q {value!r} for {key}: expected a rescaling divisor in (0, 1]")
    return divisors


def phi(drop):
    """(1 - 2p) / log((1 - p) / p), with its limit 1/2 at p = 1/2 (the sub-Gaussian variance
    proxy of a Bernoulli(1 - p) mask, in the analytic q)."""
    if abs(drop - 0.5) < 1e-9:
        return 0.5
    return (1.0 - 2.0 * drop) / math.log((1.0 - drop) / drop)


def analytic_q(c, drop, eta, prob=0.95, step=0.001):
    """DAREx-q per output row of one layer, analytically (the authors' analyticalq.py).

    `c` [rows, columns]: delta_W * mean input per entry (the bias delta, times its input 1, as
    an extra column). For each row, over q on a `step` grid from 1 - p to 0.998, the q that
    minimises |eta (1 - (1 - p)/q) sum(c) + eta^2 phi(p) sum(c^2) / (4 q^2) + log(2/(1-prob))|,
    a bound on the row's output change that holds with probability `prob`; `eta` balances
    its two terms and is chosen by a criterion (delta_search.py). The layer's q is the mean
    over rows. Differences from the authors' code: float64 instead of float16, and no early
    stop of the scan once 80% of rows have passed their minimum (neither is part of the
    method); ties go to the larger q, as theirs do.
    """
    start = round((1.0 - drop) / step)
    grid = torch.arange(start, round(0.998 / step) + 1, dtype=torch.float64) * step
    c = c.to(torch.float64)
    sum_c, sum_c2 = c.sum(dim=1, keepdim=True), (c ** 2).sum(dim=1, keepdim=True)
    objective = (eta * (1.0 - (1.0 - drop) / grid) * sum_c
                 + eta ** 2 * phi(drop) * sum_c2 / (4.0 * grid ** 2)
                 + math.log(2.0 / (1.0 - prob))).abs()
    # Ties to the larger q: argmin of the reversed grid.
    last = objective.flip(1).argmin(dim=1)
    return grid.flip(0)[last]


def layer_qs(delta, mean_inputs, drop, eta):
    """{key: q} for every tensor of `delta`: each linear layer with a mean input
    (`mean_inputs`: {module name: vector}) gets analytic_q's row mean, its bias the same q,
    and every other tensor the mean over those layers (as in the authors' rescale_q)."""
    qs = {}
    for name, mean_input in mean_inputs.items():
        weight, bias = f"{name}.weight", f"{name}.bias"
        if weight not in delta or delta[weight].dim() != 2:
            continue
        c = delta[weight] * mean_input.reshape(1, -1)
        if bias in delta:
            c = torch.cat([c, delta[bias].reshape(-1, 1)], dim=1)
        qs[weight] = float(analytic_q(c, drop, eta).mean())
        if bias in delta:
            qs[bias] = qs[weight]
    if not qs:
        raise InputError("analytic q: no linear layer of the delta has a measured input")
    mean_q = sum(qs.values()) / len(qs)
    return {key: qs.get(key, mean_q) for key in delta}


def _keep_largest(d, drop):
    keep = int(round((1.0 - drop) * d.numel()))
    if keep >= d.numel():
        return d.clone()
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(d.abs().flatten(), keep).indices] = True
    return torch.where(mask.view_as(d), d, torch.zeros_like(d))


def rebuild(base, delta):
    """The variant's state dict: base plus the (pruned) delta."""
    return {key: base[key] + delta[key] if key in delta else base[key] for key in base}


def encode_seeded(pruned, drop, seed):
    """A DARE or DAREx-q delta stored without its masks: they come back from (seed, p), so only
    the kept entries' values are stored, in key order, with a hash of the masks that checks on
    loading that this machine's torch draws the same masks from the seed. At p = 0.9 the masks'
    bitmask would be a fifth of the file."""
    masks = random_masks({key: d.shape for key, d in pruned.items()}, drop, seed)
    return {"format": SEEDED_FORMAT, "seed": seed, "drop": drop,
            "shapes": {key: list(d.shape) for key, d in pruned.items()},
            "values": {key: d[masks[key]].clone() for key, d in pruned.items()},
            "mask_sha256": _masks_digest(masks)}


def decode_seeded(entry, where="delta"):
    masks = random_masks(entry["shapes"], entry["drop"], entry["seed"])
    if _masks_digest(masks) != entry["mask_sha256"]:
        raise InputError(f"{where}: this torch ({torch.__version__}) draws other masks from seed "
                         f"{entry['seed']} than the one that wrote the delta; rebuild it with "
                         "the torch version in delta.json")
    delta = {}
    for key, shape in entry["shapes"].items():
        values = entry["values"][key]
        delta[key] = torch.zeros(shape, dtype=values.dtype)
        delta[key][masks[key]] = values
    return delta


def _masks_digest(masks):
    digest = hashlib.sha256()
    for key in sorted(masks):
        digest.update(key.encode())
        digest.update(np.packbits(masks[key].flatten().numpy()).tobytes())
    return digest.hexdigest()


def _encoded(delta, masks_from):
    """How save_delta stores a delta: seeded (masks_from = (p, seed)) or bitmask + values."""
    if masks_from is not None:
        return encode_seeded(delta, *masks_from)
    return encode_sparse(delta, min_zero_fraction=0.0)


def stored_bytes(state, masks_from=None):
    """Bytes of `state` stored as save_delta stores it, in memory."""
    buffer = io.BytesIO()
    torch.save(_encoded(state, masks_from), buffer)
    return buffer.tell()


def save_delta(out_dir, delta, info, masks_from=None):
    """Writes delta.ckpt and delta.json (settings, seed, bytes). The delta is stored as
    bitmask + values, or with masks_from = (p, seed) (DARE, DAREx-q) as its kept values alone
    (encode_seeded)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(_encoded(delta, masks_from), out_dir / DELTA_FILE)
    nonzero = sum(int(torch.count_nonzero(d)) for d in delta.values())
    squares = sum(float((d.double() ** 2).sum()) for d in delta.values())
    entries = sum(d.numel() for d in delta.values())
    info = {**info, "bytes": (out_dir / DELTA_FILE).stat().st_size,
            "delta_rms": math.sqrt(squares / entries) if entries else 0.0,
            "storage": SEEDED_FORMAT if masks_from is not None else "bitmask",
            "torch": torch.__version__,
            "delta_entries": entries, "delta_nonzero": nonzero}
    (out_dir / DELTA_INFO).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n",
                                      encoding="utf-8")
    return info


def load_delta(folder):
    """The dense pruned delta written by save_delta."""
    path = Path(folder) / DELTA_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing; expected a folder written by `conformer-prune delta`")
    stored = torch.load(path, map_location="cpu")
    if stored.get("format") == SEEDED_FORMAT:
        return decode_seeded(stored, str(path))
    return decode_sparse(stored)


# ----- command line ------------------------------------------------------------------------


def make_delta(base_run, finetuned_run, out_dir, method, drop, q=None, seed=0, q_record=None):
    """Prunes the delta of a fine-tuned run against its base run; writes `out_dir` with the
    delta (delta.ckpt, delta.json), the variant's tokenizer and normaliser, and `model/`, the
    rebuilt variant as an inference folder that `conformer-prune decode` scores. `q` (darex_q)
    is a number or {key: q}; `q_record` says how it was chosen (delta_search.choose_q)."""
    # Imported here: the delta math above needs no model code.
    from conformer_prune.shrink import decode_opts_from, load_gated_run

    base, finetuned = load_gated_run(base_run), load_gated_run(finetuned_run)
    if not (finetuned["tokenizer"] and finetuned["normalizer"]):
        raise InputError(f"{finetuned['run_dir']}: no tokenizer or normaliser to ship with "
                         "the variant")
    base_state = base["modules"].state_dict()
    pruned = prune_delta(delta_of(base_state, finetuned["modules"].state_dict()),
                         method, drop, q, seed)
    out_dir = Path(out_dir)
    info = save_delta(out_dir, pruned, {
        "method": method, "drop": drop, "q": q if method == "darex_q" else None, "seed": seed,
        "q_search": q_record,
        "base": str(base["checkpoint"]), "finetuned": str(finetuned["checkpoint"]),
        "rebuild": f"conformer-prune delta apply {base_run} {out_dir} --out VARIANT_DIR",
    }, masks_from=(drop, seed) if method in RANDOM_MASK_METHODS else None)
    shutil.copyfile(finetuned["tokenizer"], out_dir / "tokenizer.model")
    shutil.copyfile(finetuned["normalizer"], out_dir / "normalizer.ckpt")
    (out_dir / "decode_opts.json").write_text(
        json.dumps(decode_opts_from(finetuned["hparams"])), encoding="utf-8")
    # Rebuilt from the files just written, as a user rebuilds it: the variant decoded is the
    # one the delta folder ships (at the cost of reading the base run a second time).
    apply_delta(base_run, out_dir, out_dir / "model")
    return info


def apply_delta(base_run, delta_dir, out_dir):
    """Base run + delta folder -> the variant's inference folder (the rebuild command)."""
    from conformer_prune.shrink import export_inference_folder, load_gated_run, shrink_modules

    delta_dir = Path(delta_dir)
    base = load_gated_run(base_run)
    modules = base["modules"]
    modules.load_state_dict(rebuild(modules.state_dict(), load_delta(delta_dir)))
    widths = shrink_modules(modules)  # the model's widths (a dense base loses nothing)
    decode_opts = json.loads((delta_dir / "decode_opts.json").read_text(encoding="utf-8"))
    export_inference_folder(out_dir, modules, base["arch"], base["base_widths"] or widths,
                            delta_dir / "tokenizer.model", delta_dir / "normalizer.ckpt",
                            decode_opts)
    return out_dir


def add_parser(subparsers):
    from conformer_prune.delta_search import Q_SEARCHES

    parser = subparsers.add_parser(
        "delta", help="store a fine-tuned variant as a pruned delta from its base (DARE, ...)",
        description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    make = modes.add_parser("make", help="prune the delta of FINETUNED against BASE")
    make.add_argument("base", help="the base training run (results/<name>/<seed>)")
    make.add_argument("finetuned", help="the fine-tuned run of the same architecture")
    make.add_argument("--method", choices=METHODS, default="dare")
    make.add_argument("--drop", type=float, required=True, help="drop rate p in [0, 1)")
    make.add_argument("--q", type=float, default=None,
                      help="darex_q: the rescaling divisor (DARE's is 1 - p)")
    make.add_argument("--q-search", choices=Q_SEARCHES, default=None,
                      help="darex_q: choose q by dev WER, by the unlabelled output change, or "
                           "per layer analytically (docs/DELTA.md); needs --data-folder")
    make.add_argument("--data-folder", default=None,
                      help="the fine-tuning domain's LibriSpeech-layout folder (its dev-clean "
                           "is searched)")
    make.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    make.add_argument("--out", required=True, help="the delta folder to write")
    make.set_defaults(func=_run_make)
    apply = modes.add_parser("apply", help="rebuild the variant from BASE and a delta folder")
    apply.add_argument("base")
    apply.add_argument("delta", help="a folder written by `conformer-prune delta make`")
    apply.add_argument("--out", required=True, help="the variant's inference folder")
    apply.set_defaults(func=_run_apply)
    _add_sweep_parser(modes)
    return parser


def _add_sweep_parser(modes):
    from conformer_prune.delta_search import SWEEP_METHODS

    sweep = modes.add_parser(
        "sweep", help="WER of pruned deltas over drop rates, methods and mask seeds")
    sweep.add_argument("base", help="the base training run")
    sweep.add_argument("finetuned", help="the fine-tuned run")
    sweep.add_argument("--data-folder", required=True, help="the fine-tuning domain's corpus")
    sweep.add_argument("--base-data-folder", required=True, help="the base's corpus")
    sweep.add_argument("--drops", default="0.5,0.9,0.95,0.99", help="drop rates p")
    sweep.add_argument("--methods", default=",".join(SWEEP_METHODS),
                       help="comma-separated, of: %(default)s")
    sweep.add_argument("--seeds", default="0,1,2", help="mask seeds (the first chooses q)")
    sweep.add_argument("--base-test-seeds", default="0",
                       help="seeds whose variants are also scored on the base's test split")
    sweep.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sweep.add_argument("--out", required=True, help="the sweep folder (a rerun resumes it)")
    sweep.set_defaults(func=_run_sweep)
    report = modes.add_parser("report", help="table and figure of one or more sweeps")
    report.add_argument("sweeps", nargs="+", help="sweep folders (one per fine-tuned variant)")
    report.add_argument("--out", required=True, help="the dashboard folder")
    report.set_defaults(func=_run_report)


def _numbers(text, kind):
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{text!r}: expected comma-separated {kind.__name__} values") from None


def _run_make(args):
    q, record = args.q, None
    if args.q_search:
        if args.method != "darex_q" or args.data_folder is None or args.q is not None:
            raise InputError("--q-search goes with --method darex_q and --data-folder, "
                             "without --q")
        from conformer_prune.delta_search import search_q
        q, record = search_q(args.base, args.finetuned, args.q_search, args.drop, args.seed,
                             args.data_folder)
        record = {k: v for k, v in record.items() if k != "q"}
    info = make_delta(args.base, args.finetuned, args.out, args.method, args.drop, q,
                      args.seed, record)
    print(f"delta: {info['delta_nonzero']:,} of {info['delta_entries']:,} entries kept, "
          f"{info['bytes']:,} bytes ({args.out}/{DELTA_FILE}); variant: {args.out}/model")
    return 0


def _run_apply(args):
    print(f"wrote {apply_delta(args.base, args.delta, args.out)}")
    return 0


def _run_sweep(args):
    from conformer_prune.delta_search import sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    out = sweep(args.base, args.finetuned, args.out, args.data_folder, args.base_data_folder,
                _numbers(args.drops, float), args.methods.split(","),
                _numbers(args.seeds, int), _numbers(args.base_test_seeds, int))
    print(f"wrote {out}/points (conformer-prune delta report {out} --out DIR)")
    return 0


def _run_report(args):
    from conformer_prune.delta_report import write_delta_report

    out = write_delta_report(args.sweeps, args.out)
    print(f"wrote {out}/index.html, {out}/delta.md")
    return 0
