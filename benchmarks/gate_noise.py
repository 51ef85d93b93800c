"""How noisy the gate logits' gradients are against the regulariser's pull, from a checkpoint.

Reads the last checkpoint of a gated run: the gate logits (`model.ckpt`) and the gate
optimizer's Adam moments (`gate_optimizer.ckpt`, bias-corrected). Per retention band it prints
the median gradient RMS (sqrt of Adam's second moment) and the median pull of the regulariser,
`2 alpha (beta - c) / N` (mean-normalised, without cost weights). When the RMS is many times the
pull, Adam moves a logit by a small fraction of its learning rate per step (docs/TRAINING.md).

    python benchmarks/gate_noise.py results/conformer_adrop_mini/1986
"""

import argparse

import torch

from conformer_prune.gates import iter_gates
from conformer_prune.shrink import load_gated_run

BANDS = ((0.0, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.0001))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a gated run folder (its latest checkpoint) or a CKPT+ folder")
    parser.add_argument("--alpha", type=float, default=0.5, help="the run's regulariser alpha")
    parser.add_argument("--target", type=float, default=-4.0, help="the target c at the end")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.98),
                        help="the gate optimizer's Adam betas")
    return parser.parse_args()


def main():
    args = parse_args()
    run = load_gated_run(args.run)
    checkpoint = run["checkpoint"]
    state = torch.load(checkpoint / "gate_optimizer.ckpt", map_location="cpu")
    # The gate optimizer holds exactly the gate logits, in the model's parameter order.
    logits = torch.cat([gate.logits.detach().flatten() for _, gate in iter_gates(run["modules"])])
    moments = [state["state"][i] for i in sorted(state["state"])]
    step = float(moments[0]["step"])
    beta1, beta2 = args.betas
    first = torch.cat([m["exp_avg"].flatten() for m in moments]) / (1 - beta1**step)
    second = torch.cat([m["exp_avg_sq"].flatten() for m in moments]) / (1 - beta2**step)
    if first.numel() != logits.numel():
        raise SystemExit(f"{checkpoint}: {first.numel()} optimizer entries, {logits.numel()} logits")
    rms = second.sqrt()
    pull = 2 * args.alpha * (logits - args.target).abs() / logits.numel()
    retention = torch.sigmoid(logits)
    print(f"{checkpoint}: {logits.numel()} gate logits after {step:.0f} steps")
    print(f"{'retention':>10} {'units':>6} {'grad RMS':>10} {'pull':>10} {'RMS/pull':>9} "
          f"{'|mean|/RMS':>10}")
    for low, high in BANDS:
        band = (retention >= low) & (retention < high)
        if not band.any():
            continue
        ratio = (first[band].abs() / rms[band]).median()
        print(f"{low:4.1f}-{min(high, 1.0):3.1f} {int(band.sum()):6d} {rms[band].median():10.2e} "
              f"{pull[band].median():10.2e} {rms[band].median() / pull[band].median():9.1f} "
              f"{ratio:10.2f}")


if __name__ == "__main__":
    main()
