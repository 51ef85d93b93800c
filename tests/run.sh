#!/usr/bin/env bash
# The test command of the README: set-up on a fresh machine, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup.sh
python3 -m pytest -q "$@"
