#!/usr/bin/env bash
# Every GPU check and benchmark in one script, for a session lent a GPU machine (device tool). First, here:
#   bash benchmarks/gpu_wheels.sh            # pydantic + DeepSpeed wheels into .whl/ (the GPU image lacks them)
# then through the device tool:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540)
# It installs what the GPU machine lacks into /tmp/site (wheels carried in .whl/ when pip has no network),
# runs the CUDA tests, then the benchmarks, each under its own time limit, and leaves the outputs in $OUT
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
export PYTHONPATH="${PYTHONPATH:-}:$PWD/sdk/python"
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, "GiB")
PY
# The platform runs from the working tree: map the namespace folders without installing.
python3 - <<'PY'
import pathlib, site, sys
root = pathlib.Path.cwd()
shim = pathlib.Path("/tmp/site" if pathlib.Path("/tmp/site").exists() else site.getusersitepackages())
shim.mkdir(parents=True, exist_ok=True)
(shim / "internlm2_tree.pth").write_text(f"import sys; sys.path.insert(0, '{root}/.gpu-ns')\n")
ns = root / ".gpu-ns" / "internlm2"
ns.mkdir(parents=True, exist_ok=True)
for name, folder in {"core": "core", "services": "services", "plugins": "plugins",
                     "v1": "sdk/python/internlm2/v1"}.items():
    link = ns / name
    if not link.exists():
        link.symlink_to(root / folder)
PY
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"; }
run cuda-tests 150 python3 -m pytest -q -x -k "cuda or triton" tests/test_kernels.py tests/test_engine_kernels.py -p no:cacheprovider
run kernels 90 python3 benchmarks/bench_kernels.py
run prefill 60 python3 benchmarks/bench_model.py --seq 2048
run engine 200 python3 benchmarks/bench_engine.py --json "$OUT/engine.json"
run training 150 python3 benchmarks/bench_training.py --deepspeed
echo "done; outputs in $OUT"
