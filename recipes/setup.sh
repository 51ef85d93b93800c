#!/usr/bin/env bash
# Installs what conformer-prune needs on a fresh Debian machine: the speech synthesisers, sox and
# libsndfile (corpus builder, audio I/O), Chromium (dashboard browser test), and the Python
# package with its pinned torch/torchaudio pair. Quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

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

# torch and torchaudio 2.11 come as a matching pair from the registry (CUDA builds, ~4.6 GB the
# first time; they run on CPU). SpeechBrain imports torchaudio, so the pair must match.
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
