#!/usr/bin/env bash
# The test command: install (idempotent) and run the whole suite. CI runs exactly this (.ci/run).
# Tests live in tests/<area>/ (core, engine, services, runtime, stages, sdk, deploy); arguments go to pytest,
# e.g. `bash scripts/test.sh tests/engine` or `-m "not integration"` to leave out the slow real-process runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# buf lints the protos (tests/sdk/test_protos.py); it comes from npm into the ignored node_modules/.
[ -x node_modules/.bin/buf ] || npm install --no-save --no-package-lock --silent @bufbuild/buf@1.75.0
. .venv/bin/activate
ruff check .
python -m pytest "$@"
