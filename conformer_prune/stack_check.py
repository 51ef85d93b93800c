"""Checks that the installed Python stack is the tested one and imports; one line if not.

    python -m conformer_prune.stack_check

recipes/setup.sh runs it after pip. Why: a torchaudio built for another torch fails deep inside
the first stage with `undefined symbol: ...` from libtorchaudio.so; this says instead which pair
is wrong and the command that fixes it. It reads the versions from the package metadata before
importing anything, so it works even when the import itself is what fails.
"""

import importlib
import sys
from importlib import metadata

# The pair that must match, and the packages every stage imports.
PAIR = ("torch", "torchaudio")
IMPORTS = ("torch", "torchaudio", "speechbrain", "sentencepiece", "jiwer", "soundfile",
           "hyperpyyaml")
FIX = ('pip install -c requirements/constraints.txt -e ".[dev]"  '
       "(or: bash recipes/setup.sh)")


def pinned_versions(dist="conformer-prune"):
    """{package: version} of this project's `==` requirements, from the installed metadata."""
    pins = {}
    for requirement in metadata.requires(dist) or []:
        spec = requirement.split(";")[0].replace(" ", "")
        if "==" in spec:
            name, version = spec.split("==", 1)
            pins[name.lower()] = version
    return pins


def installed_version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_problems(pins, installed=installed_version):
    """One message per pinned package that is missing or at another version."""
    problems = []
    for name, wanted in sorted(pins.items()):
        have = installed(name)
        if have is None:
            problems.append(f"{name} is not installed (needs {name}=={wanted})")
        elif have.split("+")[0] != wanted:  # a local tag such as +cu128 is the same release
            problems.append(f"{name} {have} is installed but {name}=={wanted} is the tested "
                            "version")
    return problems


def pair_text(installed=installed_version):
    return " with ".join(f"{name} {installed(name) or 'missing'}" for name in PAIR)


def import_problem(modules=IMPORTS):
    """The first module that fails to import, with the last line of its error; None if all do."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # an ImportError, or an OSError from a shared library
            message = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            return f"import {module} failed: {type(error).__name__}: {message}"
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        pins = pinned_versions()
    except metadata.PackageNotFoundError:
        print(f"stack check: conformer-prune is not installed; run {FIX}", file=sys.stderr)
        return 1
    problems = version_problems(pins)
    failed_import = import_problem()
    if failed_import:
        problems.append(f"{failed_import} ({pair_text()})")
    if problems:
        print(f"stack check: {'; '.join(problems)}. Fix: {FIX}", file=sys.stderr)
        return 1
    if "--quiet" not in argv:
        print(f"stack check: {pair_text()}, speechbrain {installed_version('speechbrain')}: "
              "imports fine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
