#!/usr/bin/env bash
# Installs what conformer-prune needs on a fresh Debian machine: the speech synthesisers, sox and
# libsndfile (corpus builder, audio I/O), Chromium (dashboard browser test), and the Python
# package with the exact versions in requirements/constraints.txt. Quick when everything is
# already there. Then checks that the stack imports, and says in one line what is wrong if not.
#   PYTHON=/path/to/venv/bin/python bash recipes/setup.sh   # install into another interpreter
#   SETUP_SKIP_APT=1 ...                                    # Python packages only
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
started=$(date +%s)

if [ -z "${SETUP_SKIP_APT:-}" ]; then
    apt_packages=(espeak-ng flite sox libsndfile1 fortune-mod fortunes fortunes-min chromium)
    missing=()
    for pkg in "${apt_packages[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "setup: installing Debian packages: ${missing[*]}"
        sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi

# torch and torchaudio are one tested pair (CUDA builds from the registry, ~4.6 GB the first
# time; they run on CPU); SpeechBrain imports torchaudio, so the pair must match. The constraints
# file pins every package the set-up installs, so a new upstream release changes nothing here.
# (sed drops the warnings of a pip configuration that lists local indexes this machine lacks)
"$PYTHON" -m pip install -q --disable-pip-version-check \
    -c requirements/constraints.txt -e ".[dev]" 2>&1 \
    | sed -e "/is ignored: it is neither a file nor a directory/d" \
          -e "/Running pip as the 'root' user/d"

"$PYTHON" -m conformer_prune.stack_check
echo "setup: done in $(( $(date +%s) - started )) s"
