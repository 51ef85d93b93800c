"""Fine-tuned variants stored as pruned deltas: DARE, DAREx-q and magnitude (METHODS.md section 3).

A variant fine-tuned from a base model is `W_ft = W_base + D`. Delta-parameter pruning keeps a
fraction of D and rescales it, so that the variant ships as a sparse delta:

- DARE (Yu et al. 2024): per tensor, drop each entry with probability p (a Bernoulli mask drawn
  from a seeded generator), rescale the survivors by 1 / (1 - p): `D' = (1 - m) D / (1 - p)`,
  which keeps the expected value of every entry.
- DAREx-q (Deng et al. 2025): the same mask, survivors divided by q instead of 1 - p
  (q = 1 - p is DARE). How q is chosen (a dev-WER grid, an unlabelled criterion, per layer) is
  the caller's: this module applies a given q.
- magnitude: per tensor, keep the largest `round((1 - p) n)` entries of |D|, no rescaling.

Which tensors: every floating-point tensor of the model's state dict that the fine-tuning
changed (the caller passes both state dicts); an unchanged tensor has a zero delta and costs
only its bitmask. The pruned delta is stored with `model.encode_sparse` (bitmask + values), with
its settings and mask seed in `delta.json`, and `rebuild` adds it back to the base.
"""

import json
import shutil
from pathlib import Path

import torch

from conformer_prune.errors import InputError
from conformer_prune.model import encode_sparse, load_weights

DELTA_FILE, DELTA_INFO = "delta.ckpt", "delta.json"
METHODS = ("dare", "darex_q", "magnitude")


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
    rescaling divisor (default 1 - p); `seed` draws the random masks (one generator, tensors
    in key order, so the same seed gives the same masks)."""
    if method not in METHODS:
        raise InputError(f"delta method {method!r}: expected one of {', '.join(METHODS)}")
    if not 0.0 <= drop < 1.0:
        raise InputError(f"drop rate {drop!r}: expected p in [0, 1)")
    if method == "magnitude":
        return {key: _keep_largest(d, drop) for key, d in delta.items()}
    divisor = (1.0 - drop) if method == "dare" or q is None else q
    if not 0.0 < divisor <= 1.0:
        raise InputError(f"q {divisor!r}: expected a rescaling divisor in (0, 1]")
    generator = torch.Generator().manual_seed(seed)
    pruned = {}
    for key in sorted(delta):
        d = delta[key]
        keep = torch.rand(d.shape, generator=generator) >= drop
        pruned[key] = torch.where(keep, d / divisor, torch.zeros_like(d))
    return {key: pruned[key] for key in delta}


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


def save_delta(out_dir, delta, info):
    """Writes delta.ckpt (bitmask + values) and delta.json (settings, seed, bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(encode_sparse(delta, min_zero_fraction=0.0), out_dir / DELTA_FILE)
    nonzero = sum(int(torch.count_nonzero(d)) for d in delta.values())
    info = {**info, "bytes": (out_dir / DELTA_FILE).stat().st_size,
            "delta_entries": sum(d.numel() for d in delta.values()), "delta_nonzero": nonzero}
    (out_dir / DELTA_INFO).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n",
                                      encoding="utf-8")
    return info


def load_delta(folder):
    """The dense pruned delta written by save_delta."""
    path = Path(folder) / DELTA_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing; expected a folder written by `conformer-prune delta`")
    return load_weights(path)


# ----- command line ------------------------------------------------------------------------


def make_delta(base_run, finetuned_run, out_dir, method, drop, q=None, seed=0):
    """Prunes the delta of a fine-tuned run against its base run; writes `out_dir` with the
    delta (delta.ckpt, delta.json), the variant's tokenizer and normaliser, and `model/`, the
    rebuilt variant as an inference folder that `conformer-prune decode` scores."""
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
        "base": str(base["checkpoint"]), "finetuned": str(finetuned["checkpoint"]),
        "rebuild": f"conformer-prune delta apply {base_run} {out_dir} --out VARIANT_DIR",
    })
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
    make.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    make.add_argument("--out", required=True, help="the delta folder to write")
    make.set_defaults(func=_run_make)
    apply = modes.add_parser("apply", help="rebuild the variant from BASE and a delta folder")
    apply.add_argument("base")
    apply.add_argument("delta", help="a folder written by `conformer-prune delta make`")
    apply.add_argument("--out", required=True, help="the variant's inference folder")
    apply.set_defaults(func=_run_apply)
    return parser


def _run_make(args):
    info = make_delta(args.base, args.finetuned, args.out, args.method, args.drop, args.q,
                      args.seed)
    print(f"delta: {info['delta_nonzero']:,} of {info['delta_entries']:,} entries kept, "
          f"{info['bytes']:,} bytes ({args.out}/{DELTA_FILE}); variant: {args.out}/model")
    return 0


def _run_apply(args):
    print(f"wrote {apply_delta(args.base, args.delta, args.out)}")
    return 0
