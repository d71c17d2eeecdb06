#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before benchmarks/gpu_session.sh: the GPU image has torch, triton,
# transformers, safetensors, sentencepiece, grpcio and protobuf but no pydantic (the stage configs the
# training benchmark imports) and no DeepSpeed. Wheels for its Python 3.12 go into .whl/ (ignored by git),
# which the device tool carries: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl pydantic pydantic-core annotated-types typing-inspection hjson
# DeepSpeed ships as an sdist: build its (pure Python) wheel here; its ops compile just in time there.
python3 -m pip wheel -q --no-deps -w .whl deepspeed
ls .whl
