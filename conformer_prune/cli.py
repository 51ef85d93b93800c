"""The `conformer-prune` command: one subcommand per stage of the pipeline.

Each stage module owns its subcommand (`add_parser`), so the options live beside the code.
"""

import argparse
import logging
import sys

from conformer_prune.errors import InputError, print_input_error

SUBCOMMAND_MODULES = ("synth", "prepare", "shrink", "decode", "export", "report", "delta",
                      "checkpoints")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="conformer-prune",
        description="Train, shrink, decode and compare pruned Conformer ASR models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        module = __import__(f"conformer_prune.{name}", fromlist=["add_parser"])
        module.add_parser(subparsers)
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(name)s - %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        # Bad input: one line naming the item, no traceback (docs/RELIABILITY.md).
        return print_input_error(err)


if __name__ == "__main__":
    sys.exit(main())
