#!/usr/bin/env bash
# Set up speechtl on a fresh Debian/Ubuntu machine with Python 3.11:
# a virtual environment in .venv with the package and its test tools, espeak-ng, and chromium
# with its driver (for the browser test of `speechtl serve`).
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing $* with apt-get"
        (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "setup: please install $* (e.g. sudo apt-get install $*) and run this again" >&2
        exit 1
    fi
}

if ! "$PY" -c "import venv, ensurepip" 2>/dev/null; then
    apt_install python3-venv
fi
if ! command -v espeak-ng >/dev/null; then
    apt_install espeak-ng
fi
# the browser test of `speechtl serve`'s page (it skips, saying so, where these are missing)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt_install chromium chromium-driver
    else
        echo "setup: chromium and chromium-driver are missing: the browser test of speechtl serve will skip" >&2
    fi
fi
# the main job's transcript of speech from another synthesiser: festival's Czech diphone voice
if ! command -v text2wave >/dev/null || [ ! -d /usr/share/festival/voices/czech/czech_ph ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt_install festival festival-czech festvox-czech-ph
    else
        echo "setup: festival and festvox-czech-ph are missing: the demo prints no transcript of festival's voice" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import speechtl, torch, torchaudio, transformers, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.speechtl-installed ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch .venv/.speechtl-installed
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
