#!/usr/bin/env python3
"""Where the encoder's time goes, dense against shrunk: time per part of the model and per
torch operator, beside each part's FLOPs, in one process.

    python benchmarks/encoder_profile.py --dense results/speed/dense_1986 \
        --compact results/conformer_adrop_mini/1986/compact --data-folder corpus

Both folders are inference folders written by `conformer-prune shrink` (on a dense run it writes
the dense model in the same compact modules, every unit kept), so both run the same code.

The encoder is the timed work of `shrink_speed.py` (CNN front end and Conformer encoder on
filterbanks computed beforehand), on the same 16 test-clean utterances, at batch 16 (one padded
batch) and at batch 1 (one utterance after the other). Parts are timed with forward hooks
(perf_counter before and after each module; one thread, so the CPU runs one module at a time);
"rest" is what no part covers (residual additions, masks, the positional encoding's slicing).
The operator table is torch.profiler's self CPU time. A part whose time share is well above
its FLOP share is where the shrunk encoder loses against its FLOP reduction.
"""

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from common import machine, write_report
from conformer_prune.decode import load_inference_folder
from shrink_speed import load_batch

LAYER_PARTS = {
    "ffn_module1": "ffn",
    "ffn_module2": "ffn",
    "mha_layer": "attention",
    "convolution_module": "conv",
    "norm1": "layer norms",
    "norm2": "layer norms",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="inference folder of the dense model")
    parser.add_argument("--compact", required=True, help="the compact (shrunk) model folder")
    parser.add_argument("--data-folder", required=True)
    parser.add_argument("--utterances", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="operators listed per model")
    parser.add_argument("--out", help="also write the report as JSON here")
    parser.add_argument("--markdown", help="also write the per-part tables as markdown here")
    return parser.parse_args()


def named_parts(asr):
    """(part name, module) for every timed module: front end, input projection, positional
    encoding, each layer's parts by kind, the final LayerNorm."""
    transformer = asr.Transformer
    yield "front end (CNN)", asr.CNN
    yield "input projection", transformer.custom_src_module
    yield "positional encoding", transformer.positional_encoding
    for layer in transformer.encoder.layers:
        for name, kind in LAYER_PARTS.items():
            yield kind, getattr(layer, name)
    yield "layer norms", transformer.encoder.norm


class PartMeter:
    """Adds up, per part, how much of a running quantity (wall time, or FLOPs counted so far)
    accrues inside its modules, by forward hooks."""

    def __init__(self, asr, reading):
        self.reading = reading
        self.totals = defaultdict(float)
        self.handles = []
        for name, module in named_parts(asr):
            self.handles.append(module.register_forward_pre_hook(self._start))
            self.handles.append(module.register_forward_hook(self._stop(name)))

    def _start(self, module, args):
        module.__dict__["_meter_started"] = self.reading()

    def _stop(self, name):
        def hook(module, args, output):
            self.totals[name] += self.reading() - module.__dict__["_meter_started"]
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def part_flops(asr, calls):
    """FLOPs per part (FlopCounterMode's running global count, read by the hooks) and in all."""
    counter = FlopCounterMode(display=False)
    meter = PartMeter(asr, lambda: sum(counter.flop_counts["Global"].values()))
    try:
        with counter:
            for call in calls:
                call()
    finally:
        meter.remove()
    total = counter.get_total_flops()
    parts = dict(meter.totals)
    parts["rest"] = total - sum(parts.values())
    return total, parts


def profile_parts(workloads, repeats):
    """Seconds per part and in all for each model, averaged over `repeats` runs of its calls
    (zero-argument functions), alternating between the models so that a change of machine load
    hits all alike. workloads: {model name: (asr, calls)}."""
    meters = {name: PartMeter(asr, time.perf_counter) for name, (asr, _) in workloads.items()}
    totals = dict.fromkeys(workloads, 0.0)
    try:
        for _ in range(repeats):
            for name, (_, calls) in workloads.items():
                started = time.perf_counter()
                for call in calls:
                    call()
                totals[name] += time.perf_counter() - started
    finally:
        for meter in meters.values():
            meter.remove()
    results = {}
    for name, meter in meters.items():
        parts = {part: seconds / repeats for part, seconds in meter.totals.items()}
        parts["rest"] = totals[name] / repeats - sum(parts.values())
        results[name] = (totals[name] / repeats, parts)
    return results


def top_operators(calls, count):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for call in calls:
            call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
         "share": round(e.self_cpu_time_total / total, 3)}
        for e in events[:count]
    ]


def encoder_calls(asr, feats, lens, batch):
    """The encoder over the utterances: one padded batch, or one call per utterance on its own
    unpadded filterbanks."""
    def encode(x, length):
        return asr.Transformer.encode(asr.CNN(x), length)

    if batch > 1:
        return [lambda: encode(feats, lens)]
    frames = (lens * feats.shape[1]).round().long()
    ones = torch.ones(1)
    return [lambda i=i: encode(feats[i: i + 1, : frames[i]], ones) for i in range(len(feats))]


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for name, folder in (("dense", args.dense), ("shrunk", args.compact)):
        inference = vars(load_inference_folder(folder).hparams)
        models[name] = (inference["asr"].eval(), inference["normalize"].eval())
    wavs, lens, seconds = load_batch(args.data_folder, "test-clean", args.utterances,
                                     Path(args.compact) / "benchmark_data")
    features = inference["compute_features"]
    with torch.no_grad():
        feats = {name: norm(features(wavs), lens) for name, (_, norm) in models.items()}
    report = {"machine": machine(), "audio_seconds": round(seconds, 2),
              "utterances": len(wavs), "repeats": args.repeats, "batches": {}}
    for batch in (16, 1):
        workloads = {name: (asr, encoder_calls(asr, feats[name], lens, batch))
                     for name, (asr, _) in models.items()}
        # FlopCounterMode tracks modules through autograd hooks: count outside no_grad.
        counted = {name: part_flops(asr, calls) for name, (asr, calls) in workloads.items()}
        with torch.no_grad():
            for _, calls in workloads.values():  # warm-up
                for call in calls:
                    call()
            timed = profile_parts(workloads, args.repeats)
            operators = {name: top_operators(calls, args.top)
                         for name, (_, calls) in workloads.items()}
        entry = report["batches"][f"b{batch}"] = {}
        for name in models:
            (seconds_total, parts), (flops_total, flop_parts) = timed[name], counted[name]
            entry[name] = {
                "seconds": round(seconds_total, 4),
                "gflops": round(flops_total / 1e9, 3),
                "parts": {part: {"seconds": round(value, 4),
                                 "gflops": round(flop_parts.get(part, 0) / 1e9, 3)}
                          for part, value in sorted(parts.items(), key=lambda kv: -kv[1])},
                "operators": operators[name],
            }
    write_report(report, args.out)
    table = markdown(report)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table, encoding="utf-8")


def markdown(report):
    """Per part: dense and shrunk time and FLOPs, and how the time ratio compares with the
    FLOP ratio (1 = the part's time follows its FLOPs)."""
    machine_line = report["machine"]
    lines = [f"Measured on {machine_line['cpu']} ({machine_line['cores']} cores), "
             f"{machine_line['torch_threads']} torch thread(s), torch {machine_line['torch']}; "
             f"{report['utterances']} test-clean utterances ({report['audio_seconds']} s of "
             f"audio), mean of {report['repeats']} passes.", ""]
    for batch, entry in report["batches"].items():
        dense, shrunk = entry["dense"], entry["shrunk"]
        lines += [f"Batch {batch[1:]}:", "",
                  "| part | dense ms | dense GFLOPs | shrunk ms | shrunk GFLOPs | time ratio | "
                  "FLOP ratio | time ratio / FLOP ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        rows = [(part, dense["parts"][part], shrunk["parts"][part]) for part in dense["parts"]]
        rows.append(("encoder in all", dense, shrunk))
        for part, d, s in rows:
            time_ratio = d["seconds"] / s["seconds"]
            flop_ratio = d["gflops"] / s["gflops"] if s["gflops"] else None
            follows = f"{time_ratio / flop_ratio:.2f}" if flop_ratio else "-"
            lines.append(
                f"| {part} | {d['seconds'] * 1e3:.1f} | {d['gflops']:.2f} | "
                f"{s['seconds'] * 1e3:.1f} | {s['gflops']:.2f} | {time_ratio:.2f} | "
                f"{f'{flop_ratio:.2f}' if flop_ratio else '-'} | {follows} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
