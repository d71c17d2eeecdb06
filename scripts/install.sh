#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the platform, the SDK/CLI and the test tools.
# TORCH_SPEC picks the PyTorch build: the default is the CPU wheel this project is developed and tested
# with; on a GPU node use e.g. TORCH_SPEC="torch>=2.4" to get the CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e "./sdk/python[dev]" -e ".[test]"
# The gateway's playground test drives Debian's chromium through playwright (which must never download a
# browser of its own: `playwright install` is not used). Installed once, when missing; needs root.
if ! command -v chromium >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "install.sh: could not install chromium; tests/services/test_playground.py will skip" >&2
fi
