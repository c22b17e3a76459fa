#!/usr/bin/env bash
# One full device session on a GPU machine: configure + build with all cores, GPU tests, moe-perf (HT and LL,
# JSON rows), optionally compute-sanitizer; logs go to $OUT (or ./device-out). Prints a short summary last.
#
#   scripts/device_session.sh [all|build|tests|perf|sanitize ...]      (default: build tests perf)
# Environment: GPU_TEST_FILTER (gtest filter for the GPU tests, default '*'), PERF_ARGS (extra moe-perf args),
#              SKIP_BUILD=1 (reuse ./build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
# Never use NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PATH=/usr/local/cuda/bin:$PATH
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests perf)
[ "${stages[0]}" = all ] && stages=(build tests perf sanitize)
summary=()
note() { summary+=("$1"); echo "== $1"; }
has() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

nvidia-smi --query-gpu=index,name,pci.bus_id,clocks.sm,memory.used --format=csv > "$OUT/gpus.txt" 2>&1
cat "$OUT/gpus.txt"
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
note "gpus: $NGPU"

if has build && [ "${SKIP_BUILD:-0}" != 1 ]; then
  t0=$(date +%s)
  if cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > "$OUT/configure.log" 2>&1 &&
     cmake --build build -j"$(nproc)" > "$OUT/build.log" 2>&1; then
    note "build: ok ($(( $(date +%s) - t0 )) s)"
  else
    note "build: FAILED (see build.log)"; tail -40 "$OUT/build.log"; printf '%s\n' "${summary[@]}"; exit 1
  fi
fi

if has tests; then
  timeout 120 build/tests/nccl_moe_unit_tests --gtest_brief=1 > "$OUT/unit.log" 2>&1
  note "unit tests: rc=$? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/unit.log" | tr '\n' ' ')"
  timeout 400 build/tests/nccl_moe_gpu_tests --gtest_filter="${GPU_TEST_FILTER:-*}" > "$OUT/gpu_tests.log" 2>&1
  rc=$?
  note "gpu tests: rc=$rc $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/gpu_tests.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]' "$OUT/gpu_tests.log" | head -20
fi

if has perf; then
  for mode in ht ll; do
    timeout 240 build/perf/moe-perf --mode "$mode" -g "$NGPU" -J "$OUT/perf_${mode}.json" ${PERF_ARGS:-} \
      > "$OUT/perf_${mode}.log" 2>&1
    note "moe-perf $mode: rc=$?"
    tail -25 "$OUT/perf_${mode}.log"
  done
fi

if has sanitize; then
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 build/tests/nccl_moe_gpu_tests \
      --gtest_filter="${SANITIZE_FILTER:-*Small*}" > "$OUT/sanitize_${tool}.log" 2>&1
    note "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_${tool}.log" | tail -1)"
  done
fi

echo "================ summary"
printf '%s\n' "${summary[@]}"
