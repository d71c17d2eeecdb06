#!/usr/bin/env bash
# Every GPU check and benchmark in one script, for a session lent a GPU machine (device tool). First, here:
#   bash benchmarks/gpu_wheels.sh            # pydantic + DeepSpeed wheels into .whl/ (the GPU image lacks them)
# then through the device tool:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=480)
# It installs what the GPU machine lacks into /tmp/site (wheels carried in .whl/ when pip has no network),
# runs the CUDA tests, then the benchmarks, each under its own time limit (420 s in all, so a 15-minute
# device budget leaves room for one rerun), and leaves the outputs in $OUT
# (or ./gpu-results) for benchmarks/RESULTS.md. The baseline (HF transformers on the same random weights)
# runs inside each benchmark, on the same card.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# The platform runs from the working tree, not installed: a folder on PYTHONPATH maps the namespace
# (internlm2.core -> core/, ...); sdk/python adds internlm2.v1 and internlm2_client (PEP 420 portions).
mkdir -p .gpu-ns/internlm2
for name in core services plugins; do ln -sfn "$PWD/$name" ".gpu-ns/internlm2/$name"; done
export PYTHONPATH="$PWD/.gpu-ns:$PWD/sdk/python${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, "GiB")
import internlm2.core, internlm2.plugins.trainer, internlm2_client  # the tree is importable
PY
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"; }
run cuda-tests 60 python3 -m pytest -q -x -k "cuda or triton" tests/core/test_kernels.py tests/engine/test_engine_kernels.py \
  tests/core/test_packed_attention.py -p no:cacheprovider
run kernels 50 python3 benchmarks/bench_kernels.py
run prefill 30 python3 benchmarks/bench_model.py --seq 2048
run engine 100 python3 benchmarks/bench_engine.py --json "$OUT/engine.json"
run training 80 python3 benchmarks/bench_training.py --deepspeed
# 1.8B loading + one step per stage with CUDA peak memory vs the planner (random weights drawn on the GPU)
run memory 100 python3 benchmarks/bench_memory.py --dir /tmp/bench-memory --json "$OUT/memory.json"
echo "done; outputs in $OUT"
