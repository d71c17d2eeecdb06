#!/usr/bin/env bash
# The test command: install (idempotent) and run the whole suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# buf lints the protos (tests/test_protos.py); it comes from npm into the ignored node_modules/.
[ -x node_modules/.bin/buf ] || npm install --no-save --no-package-lock --silent @bufbuild/buf@1.75.0
. .venv/bin/activate
ruff check .
python -m pytest "$@"
