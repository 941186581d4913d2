#!/usr/bin/env bash
# One device-tool call that checks a change on the GPU: the whole suite at this tree (4 pytest
# processes at once: the run is bound by compiling kernels on the host's cores), then decode
# attention, the Mamba state update and (with PREFILL=1) both prefill families benchmarked at a
# base tree and at this one, side by side, against vLLM's kernels (perf/vendor_vllm.py) in the
# same run.
#
# Here, before the call:  mkdir -p .base && git archive BASE | tar -x -C .base && python perf/vendor_vllm.py
#   (.base/ and .vendor/ are git-ignored: name them in the device call's carry)
# On the GPU machine:     bash perf/gpu_before_after.sh
# Writes to $OUT: gpu.txt, pytest_gpu.log, bench.log, bench_{attention,mamba,prefill}_{base,head}.json
set -uo pipefail
export PYTHONUNBUFFERED=1 AVMP_VLLM_VENDOR=$PWD/.vendor/vllm_kernels
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
HEAD_DIR=$PWD
BASE_DIR=$PWD/.base
[ -d "$BASE_DIR/avmp_triton" ] || { echo "no base tree in $BASE_DIR (see the header)"; exit 2; }
# a base from before the kernels moved into the package keeps them in a top-level kernels/
[ -d "$BASE_DIR/kernels" ] && [ ! -d "$BASE_DIR/avmp_triton/kernels" ] && cp -r "$BASE_DIR/kernels" "$BASE_DIR/avmp_triton/kernels"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/gpu.txt"

groups=("tests/ops/test_paged_attention.py tests/ops/test_attention_bad_inputs.py tests/test_spec.py tests/test_triton_env.py tests/test_packaging.py"
        "tests/ops/test_paged_prefill.py tests/ops/test_decode_step_gpu.py tests/test_examples.py tests/test_readme.py tests/test_cli.py"
        "tests/ops/test_mamba_state.py tests/ops/test_mamba_bad_inputs.py tests/memory/test_allocator_gpu.py tests/memory/test_allocator.py tests/memory/test_cache.py"
        "tests/ops/test_mamba_prefill.py tests/memory/test_allocator_stateful.py tests/engine/test_scheduler.py tests/sim/test_workloads.py tests/kernels/test_handles.py tests/kernels/test_sm90_compile.py tests/test_house.py")
listed=$(printf '%s ' "${groups[@]}" | tr ' ' '\n' | sort | grep -c .)
present=$(find tests -name 'test_*.py' | wc -l)
[ "$listed" = "$present" ] || echo "WARNING: $present test files, $listed in the groups: update the groups"
for i in "${!groups[@]}"; do
  PYTHONPATH=$HEAD_DIR timeout "${PYTEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider ${groups[$i]} \
    > "/tmp/pytest_$i.log" 2>&1 &
done
wait
for i in "${!groups[@]}"; do echo "=== ${groups[$i]}"; cat "/tmp/pytest_$i.log"; done > "$OUT/pytest_gpu.log"
grep -hE "passed|failed|error" /tmp/pytest_*.log | grep -v "^E " | tail -8

# a base from before the benchmarks took their op families' names runs them under the old ones
named() { if [ -f "$1/perf/$2.py" ]; then echo "perf/$2.py"; else echo "perf/$3.py"; fi; }
for side in base head; do
  dir=$HEAD_DIR; [ $side = base ] && dir=$BASE_DIR
  (cd "$dir" && PYTHONPATH=$dir timeout 120 python3 "$(named "$dir" bench_paged_attention bench_attention)" --no-flex \
     --batch 1 16 64 --ctx 512 4096 32768 --rep 50 --out "$OUT/bench_attention_$side.json" >> "$OUT/bench.log" 2>&1
   echo "attention $side rc=$?" >> "$OUT/bench.log")
  (cd "$dir" && PYTHONPATH=$dir timeout 120 python3 "$(named "$dir" bench_mamba_state bench_mamba)" --batch 1 64 256 \
     --rep 50 --out "$OUT/bench_mamba_$side.json" >> "$OUT/bench.log" 2>&1
   echo "mamba $side rc=$?" >> "$OUT/bench.log")
  [ "${PREFILL:-0}" = 1 ] && (cd "$dir" && PYTHONPATH=$dir timeout 170 python3 perf/bench_prefill.py --rep 50 \
     --out "$OUT/bench_prefill_$side.json" >> "$OUT/bench.log" 2>&1
   echo "prefill $side rc=$?" >> "$OUT/bench.log")
done
grep -E "rc=" "$OUT/bench.log"
