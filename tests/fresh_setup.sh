#!/usr/bin/env bash
# What a fresh machine would install: recipes/setup.sh into a new, empty virtual environment
# (Python packages only; the Debian packages are the machine's), ending with the stack check's
# imports; then every package it installed must be pinned in requirements/constraints.txt.
# CI runs this before the test suite: it catches a pin that lets a new upstream release in
# (as torchaudio 2.11.1 once broke every new machine). About 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
PYTHON="$scratch/venv/bin/python" SETUP_SKIP_APT=1 bash recipes/setup.sh
"$scratch/venv/bin/python" -m conformer_prune.stack_check --quiet

"$scratch/venv/bin/python" -m pip freeze --exclude-editable 2>/dev/null \
    | grep -vE "^(pip|setuptools)==" | sort -f > "$scratch/installed.txt"
grep -vE "^\s*(#|$)" requirements/constraints.txt | sort -f > "$scratch/pinned.txt"
unpinned=$(comm -23 "$scratch/installed.txt" "$scratch/pinned.txt")
if [ -n "$unpinned" ]; then
    echo "fresh set-up: installed but not in requirements/constraints.txt (add them):"
    echo "$unpinned"
    exit 1
fi
echo "fresh set-up: $(wc -l < "$scratch/installed.txt") packages, all as pinned"
