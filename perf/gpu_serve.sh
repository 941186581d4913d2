#!/usr/bin/env bash
# One device-tool call of the serving measurements (issue 12): STAGE names what runs, one stage or
# several in order ("tests profile"), within the tool's 10 minutes. Results go to $OUT; copy them to
# perf/results/ with a README entry.
#   STAGE=tests      the serving, graph and model tests on the GPU (graphs vs eager, long-run drain)
#   STAGE=profile    perf/profile_serve_step.py: decode step eager vs graphs, B = 1 16 64 256, vs roofline
#   STAGE=kernprof   perf/profile_decode_kernels.py: a graph decode step kernel by kernel (KBATCH, default 64)
#   STAGE=e2e        perf/bench_serve.py: ours (graphs, eager) against transformers' generate();
#                    E2E_ARGS replaces its default arguments
#   STAGE=workloads  perf/bench_serve_workloads.py under a time limit (WORKLOADS, BUDGETS, LOADS, SEEDS, N)
#   STAGE=kernels    perf/bench_fp8_decode.py (fp8 pages vs bf16 vs SDPA) and perf/bench_alloc.py (the
#                    two-launch free beside the one-program free), with the fp8 and allocator tests
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
run_stage() {
case "$1" in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/serve tests/models -s 2>&1 | tee "$OUT/pytest_gpu_serve.log" | tail -30 ;;
  profile)
    python3 perf/profile_serve_step.py --out "$OUT/profile_serve_step.json" 2>&1 | tee "$OUT/profile.log" | tail -20 ;;
  kernprof)
    python3 perf/profile_decode_kernels.py --batch "${KBATCH:-64}" --out "$OUT/profile_decode_kernels.json" 2>&1 \
      | tee "$OUT/kernprof.log" | tail -25 ;;
  e2e)
    python3 perf/bench_serve.py --out "$OUT/bench_serve.json" ${E2E_ARGS:---allocators avmp --repeats 3} 2>&1 \
      | tee "$OUT/bench_serve.log" | tail -20 ;;
  workloads)
    python3 perf/bench_serve_workloads.py --out "$OUT/bench_serve_workloads.json" --time-limit "${LIMIT:-480}" \
      --workloads ${WORKLOADS:-sharegpt} --budgets ${BUDGETS:-k32 h200} --loads ${LOADS:-x0.5 x1 x2} \
      --seeds ${SEEDS:-0 1 2} --num-requests "${N:-64}" 2>&1 | tee "$OUT/workloads.log" | tail -40 ;;
  kernels)
    python3 -m pytest -q -p no:cacheprovider tests/ops/test_paged_attention_fp8.py tests/memory 2>&1 \
      | tee "$OUT/pytest_gpu_kernels.log" | tail -5
    python3 perf/bench_fp8_decode.py --out "$OUT/bench_fp8_decode.json" 2>&1 | tee "$OUT/fp8.log" | tail -15
    python3 perf/bench_alloc.py --out "$OUT/bench_alloc.json" 2>&1 | tee "$OUT/alloc.log" | tail -15 ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
}
for stage in ${STAGE:-tests}; do
  echo "== $stage $(date +%T)"
  run_stage "$stage"
done
