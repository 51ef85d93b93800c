"""Do two runs of one recipe give the same numbers to the last digit? (refactoring check)

    python benchmarks/same_numbers.py results/conformer_adrop_mini/1986 OTHER_RUN_DIR

Compares results.json and every line of history.jsonl of two run folders exactly, leaving out
what differs by nature (times, real-time factors, commit, paths, the hyperparameter hash that
covers the output folder). Prints each difference, the fields only one of them writes (a newer
version's additions), and the count of equal values; exits 1 if a value both have differs. Used to show that moving adaptive dropout onto the method seam changed nothing.
"""

import argparse
import json
import sys
from pathlib import Path

# Keys whose values differ between two identical trainings (times, where, which commit).
IGNORED = {"epoch_seconds", "decode_seconds", "wall_seconds", "rtf", "git_commit",
           "hparams_sha256", "shrunk_from", "pruned_from", "threads", "method_detail"}


def flatten(value, prefix=""):
    """{dotted.path: leaf value} of nested dicts and lists, ignored keys left out."""
    if isinstance(value, dict):
        items = {}
        for key, sub in value.items():
            if key not in IGNORED:
                items.update(flatten(sub, f"{prefix}{key}."))
        return items
    if isinstance(value, list):
        items = {}
        for index, sub in enumerate(value):
            items.update(flatten(sub, f"{prefix}{index}."))
        return items
    return {prefix.rstrip("."): value}


def run_values(run_dir):
    run_dir = Path(run_dir)
    values = flatten(json.loads((run_dir / "results.json").read_text()), "results.")
    history = (run_dir / "history.jsonl").read_text().splitlines()
    for line in history:
        entry = json.loads(line)
        values.update(flatten(entry, f"history.epoch{entry['epoch']}."))
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    args = parser.parse_args(argv)
    a, b = run_values(args.run_a), run_values(args.run_b)
    common = a.keys() & b.keys()
    differ = sorted(key for key in common if a[key] != b[key])
    for key in differ:
        print(f"DIFFERS {key}: {a[key]!r} vs {b[key]!r}")
    for key in sorted(a.keys() ^ b.keys()):  # fields one version writes and the other not
        print(f"ONLY IN {'A' if key in a else 'B'} {key}: {a.get(key, b.get(key))!r}")
    print(f"{len(common) - len(differ)} values equal, {len(differ)} differ, "
          f"{len(a.keys() ^ b.keys())} in one run only")
    return 1 if differ else 0

if __name__ == "__main__":
    sys.exit(main())
