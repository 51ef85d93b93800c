"""The error for input a user can fix: a file, a setting, a checkpoint that does not fit.

Its message names the item (file, line, YAML key) and what was expected; the command line
(`conformer-prune`, `train.py`) prints it as one `error:` line instead of a traceback. A bug
in the code still raises whatever it raises, with its traceback.
"""


import sys


class InputError(ValueError):
    """Bad input, named in the message; see docs/RELIABILITY.md for every case handled."""


def one_line(err):
    """The message to print for an InputError: its own text, also when PyTorch's DataLoader
    re-raised it from a worker process with the worker's traceback appended."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split("InputError: ", 1)[-1]
    return text


def print_input_error(err):
    """Prints an InputError as the one `error:` line of the command line; returns its exit
    status, 1 (conformer-prune, train.py and train_lm.py alike)."""
    print(f"error: {one_line(err)}", file=sys.stderr)
    return 1


def gist(err, lines=3, chars=600):
    """The first lines of a long library error (torch's load_state_dict lists every mismatched
    tensor), joined into one, to quote inside an InputError."""
    return " ".join(str(err).strip().splitlines()[:lines])[:chars]
