"""Shared pieces of the benchmark scripts: machine description, robust timing, the report."""

import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from speechbrain.dataio.dataio import read_audio
from speechbrain.utils.data_utils import batch_pad_right


def machine():
    """What the numbers were measured on, printed beside them."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def interleaved_medians(functions, repeats, warmup=1):
    """Median times of several functions measured in alternation, so that a change of machine
    load during the run hits all of them alike."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def write_report(report, out=None):
    """Prints the benchmark's report as JSON and, with `out`, writes it there too."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")


def csv_batch(csv_path, count, spread=False):
    """`count` utterances of a prepared CSV (the first ones, or with `spread` taken evenly over
    the file, which is sorted by speaker): (list of signals, padded batch, relative lengths,
    audio seconds)."""
    with open(csv_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows = rows[:: max(1, len(rows) // count)][:count] if spread else rows[:count]
    signals = [read_audio(row["wav"]) for row in rows]
    wavs, lens = batch_pad_right(signals)
    return signals, wavs, lens, sum(len(s) for s in signals) / 16000


def flops(function, *args):
    """FLOPs of one call, by torch's FlopCounterMode (it tracks modules through autograd hooks:
    call it outside no_grad)."""
    counter = FlopCounterMode(display=False)
    with counter:
        function(*args)
    return counter.get_total_flops()
