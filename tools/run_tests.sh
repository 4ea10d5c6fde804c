#!/usr/bin/env bash
# Install what the tests need, then run the offline test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
