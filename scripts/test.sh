#!/usr/bin/env bash
# The test command: install (idempotent) and run the whole suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
ruff check .
python -m pytest "$@"
