#!/usr/bin/env bash
# One device-tool call: install, run the test suite on the GPU, the demo, and the benchmarks.
# Usage (on the GPU machine, repo root): bash perf/gpu_run.sh [pytest args...]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# install the package; fall back to the tree on PYTHONPATH
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" "$@" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
  status=${PIPESTATUS[0]}
fi
python3 -m avmp_triton 2>&1 | tee "$OUT/demo.log"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 perf/bench_alloc.py --out "$OUT/bench_alloc.json" 2>&1 | tee "$OUT/bench_alloc.log"
fi
exit $status
