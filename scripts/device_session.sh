#!/usr/bin/env bash
# One full device session on a GPU machine: configure + build with all cores, GPU tests, moe-perf (HT and LL,
# JSON rows), optionally compute-sanitizer; logs go to $OUT (or ./device-out). Prints a short summary last.
#
#   scripts/device_session.sh [all|build|tests|perf|shared|llrep|trace|procs|overlap|sanitize ...]
#   (default: build tests perf)
#   tests:    ctest -L gpu, one entry per GPU test (multi-rank tests at R = 2, 4, 8: one rank per GPU when there are
#             R GPUs, else all on GPU 0); GPU_TEST_REGEX narrows it (ctest -R), TEST_TIMEOUT_S bounds the whole run
#   shared:   moe-perf with 2 and 4 ranks sharing GPU 0 (correctness: every call verified; not NVLink timings)
#   sanitize: compute-sanitizer memcheck, racecheck and synccheck (SANITIZE_TOOLS) on SANITIZE_FILTER (default: a
#             2-rank HT and a 2-rank LL case)
# Environment: GPU_TEST_REGEX, GPU_TEST_EXCLUDE (ctest -E), PERF_MODES (default "ht ll"),
#              PERF_HT_ARGS / PERF_LL_ARGS (extra moe-perf args per mode), SANITIZE_FILTER, SKIP_BUILD=1 (reuse
#              ./build), SANITIZE_DEVICE_TIMEOUT_S (NCCL_MOE_TIMEOUT_S under the sanitizer, default 300),
#              NCCL_MOE_GIT_SHA, TEST_TIMEOUT_S (GPU tests, default 480), PERF_TIMEOUT_S (each moe-perf
#              run of the perf stage, default 300 for HT / 200 for LL), PERF_LL_EXTRA (a second LL run's args),
#              CARRIED_BUILD (a build folder configured and built on another machine for sm_90a and carried here:
#              used instead of building when its GPU test binary runs; its absolute paths are made to resolve).
# The summary, the GPU test log and the logs archive are refreshed in $OUT after every stage, so a run stopped
# by the device tool's time limit still returns what it had done.
set -uo pipefail
cd "$(dirname "$0")/.."
# Logs are written to $LOG and packed into $OUT/logs.tgz at the end (the device tool returns at most 8 files);
# the JSON rows and the summary are copied to $OUT as plain files.
RESULT_DIR=${OUT:-$PWD/device-out}
LOG=$(mktemp -d)
OUT=$LOG
export OUT
mkdir -p "$RESULT_DIR"
# Never use NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PATH=/usr/local/cuda/bin:$PATH
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests perf)
[ "${stages[0]}" = all ] && stages=(build tests perf llrep trace procs overlap sanitize)
summary=()
note() { summary+=("$1"); echo "== $1"; }
snapshot() {
  printf '%s\n' "${summary[@]}" > "$RESULT_DIR/summary.txt"
  [ -f "$LOG/gpu_tests.log" ] && cp "$LOG/gpu_tests.log" "$RESULT_DIR/"
  tar czf "$RESULT_DIR/logs.tgz" -C "$LOG" . 2>/dev/null
}
has() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

nvidia-smi --query-gpu=index,name,pci.bus_id,clocks.sm,memory.used --format=csv > "$OUT/gpus.txt" 2>&1
cat "$OUT/gpus.txt"
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
note "gpus: $NGPU"

if [ -n "${CARRIED_BUILD:-}" ] && [ -f "$CARRIED_BUILD/CMakeCache.txt" ]; then
  # The carried folder names the source and build folders of the machine it was built on: make them resolve here.
  origin=$(sed -n 's/^CMAKE_CACHEFILE_DIR:INTERNAL=//p' "$CARRIED_BUILD/CMakeCache.txt")
  root=$(dirname "$origin")
  if [ -n "$origin" ] && [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"; fi
  if "$CARRIED_BUILD"/tests/nccl_moe_gpu_tests --gtest_list_tests > /dev/null 2> "$OUT/carried.log"; then
    rm -rf build && ln -s "$CARRIED_BUILD" build && SKIP_BUILD=1
    note "build: carried ($CARRIED_BUILD, configured as $origin, sm_90a)"
  else
    note "build: the carried $CARRIED_BUILD does not run here (carried.log); building"
  fi
fi

if has build && [ "${SKIP_BUILD:-0}" != 1 ]; then
  t0=$(date +%s)
  if cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > "$OUT/configure.log" 2>&1 &&
     cmake --build build -j"$(nproc)" > "$OUT/build.log" 2>&1; then
    note "build: ok ($(( $(date +%s) - t0 )) s)"
  else
    note "build: FAILED (see build.log)"; grep -E "error" -A3 "$OUT/build.log" | head -40
    tar czf "$RESULT_DIR/logs.tgz" -C "$LOG" .; exit 1
  fi
fi

snapshot
if has tests; then
  timeout 120 build/tests/nccl_moe_unit_tests --gtest_brief=1 > "$OUT/unit.log" 2>&1
  note "unit tests: rc=$? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/unit.log" | tr '\n' ' ')"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT_S:-480}" ctest --test-dir build -L gpu --output-on-failure --timeout 300 \
    ${GPU_TEST_REGEX:+-R "$GPU_TEST_REGEX"} ${GPU_TEST_EXCLUDE:+-E "$GPU_TEST_EXCLUDE"} > "$OUT/gpu_tests.log" 2>&1
  rc=$?
  note "gpu tests: rc=$rc in $(( $(date +%s) - t0 )) s: $(grep -E 'tests passed|tests failed' "$OUT/gpu_tests.log" | tail -1); \
skipped $(grep -c '(Skipped)' "$OUT/gpu_tests.log"), passed $(grep -cE 'Test +#[0-9]+: .* Passed' "$OUT/gpu_tests.log")"
  grep -E '\*\*\*Failed|\*\*\*Timeout|Exception' "$OUT/gpu_tests.log" | head -20
  grep -E 'Test +#[0-9]+: ' "$OUT/gpu_tests.log" | awk '{print $NF, $0}' | sort -rn | head -8 | cut -c1-160
fi

snapshot
if has perf && [[ " ${PERF_MODES:-ht ll} " == *" ht "* ]]; then
  timeout "${PERF_TIMEOUT_S:-300}" build/perf/moe-perf --mode ht -g "$NGPU" -J "$OUT/perf_ht.json" ${PERF_HT_ARGS:-} \
    > "$OUT/perf_ht.log" 2>&1
  note "moe-perf ht: rc=$?"
  grep -vE '^#  ' "$OUT/perf_ht.log" | tail -22
fi
snapshot
if has perf && [[ " ${PERF_MODES:-ht ll} " == *" ll "* ]]; then
  timeout "${PERF_TIMEOUT_S:-200}" build/perf/moe-perf --mode ll -g "$NGPU" -J "$OUT/perf_ll.json" ${PERF_LL_ARGS:-} \
    > "$OUT/perf_ll.log" 2>&1
  note "moe-perf ll: rc=$?"
  grep -vE '^#  ' "$OUT/perf_ll.log" | tail -30
  if [ -n "${PERF_LL_EXTRA:-}" ]; then
    # shellcheck disable=SC2086
    timeout "${PERF_TIMEOUT_S:-200}" build/perf/moe-perf --mode ll -g "$NGPU" -J "$OUT/perf_ll_extra.json" \
      $PERF_LL_EXTRA > "$OUT/perf_ll_extra.log" 2>&1
    note "moe-perf ll ($PERF_LL_EXTRA): rc=$?"
    grep -vE '^#  ' "$OUT/perf_ll_extra.log" | tail -12
  fi
fi

snapshot
if has shared; then
  # Ranks sharing GPU 0 in one process (ncclMoeCommInitAll): every call verified against the reference. Correctness
  # only: these timings say nothing about NVLink.
  for r in 2 4; do
    # shellcheck disable=SC2086
    timeout 240 build/perf/moe-perf --mode ht -g "$r" --ranks-per-gpu "$r" --tokens 1024 --dtype bf16,fp8 -n 5 -w 2 \
      -J "$OUT/perf_shared_ht_r$r.json" > "$OUT/perf_shared_ht_r$r.log" 2>&1
    note "moe-perf ht, $r ranks on one GPU: rc=$? $(grep -E 'all checks passed|errors:' "$OUT/perf_shared_ht_r$r.log" | tail -1)"
    timeout 240 build/perf/moe-perf --mode ll -g "$r" --ranks-per-gpu "$r" -b 1 -e 128 -f 8 -n 5 -w 2 \
      -J "$OUT/perf_shared_ll_r$r.json" > "$OUT/perf_shared_ll_r$r.log" 2>&1
    note "moe-perf ll, $r ranks on one GPU: rc=$? $(grep -E 'all checks passed|errors:' "$OUT/perf_shared_ll_r$r.log" | tail -1)"
  done
  grep -vE '^#  ' "$OUT/perf_shared_ll_r4.log" | tail -14
fi

snapshot
if has llrep; then
  # The LL target shape twice more (128 tokens, 100 calls each): how far the medians move between runs.
  for i in 1 2; do
    timeout 120 build/perf/moe-perf --mode ll -g "$NGPU" -b 128 -e 128 -n 100 -J "$OUT/perf_ll_rep$i.json" \
      > "$OUT/perf_ll_rep$i.log" 2>&1
    note "moe-perf ll repeat $i: rc=$?"
    grep -vE '^#' "$OUT/perf_ll_rep$i.log" | tail -8
  done
fi

snapshot
if has trace; then
  # The LL dispatch timeline (tests/gpu/ll_trace_test.cu), raw output kept.
  NCCL_MOE_LL_TRACE=1 timeout 120 build/tests/nccl_moe_gpu_tests --gtest_filter='LlTrace.*' > "$OUT/ll_trace.log" 2>&1
  note "ll trace: rc=$?"
  grep -E '^\[ll trace\]' "$OUT/ll_trace.log" | tail -40
fi

snapshot
if has procs; then
  # One process per GPU (CUDA IPC between ranks) instead of one thread per GPU.
  timeout 200 build/perf/moe-perf --mode ht --procs "$NGPU" --tokens 1024 --dtype bf16,fp8 -n 10 \
    -J "$OUT/perf_ht_procs.json" > "$OUT/perf_ht_procs.log" 2>&1
  note "moe-perf ht --procs $NGPU: rc=$?"
  timeout 200 build/perf/moe-perf --mode ll --procs "$NGPU" -n 10 -J "$OUT/perf_ll_procs.json" \
    > "$OUT/perf_ll_procs.log" 2>&1
  note "moe-perf ll --procs $NGPU: rc=$?"
  grep -vE '^#' "$OUT/perf_ht_procs.log" "$OUT/perf_ll_procs.log" | tail -12
fi

snapshot
if has overlap; then
  timeout 300 scripts/overlap_session.sh > "$OUT/overlap.log" 2>&1
  note "overlap: rc=$?"
  tail -30 "$OUT/overlap.log"
fi

snapshot
if has sanitize; then
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
    NCCL_MOE_TIMEOUT_S=${SANITIZE_DEVICE_TIMEOUT_S:-300} timeout "${SANITIZE_TIMEOUT_S:-200}" compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 \
      build/tests/nccl_moe_gpu_tests \
      --gtest_filter="${SANITIZE_FILTER:-Ht/HtDispatchCombine.MatchesReference/Fp8Float_R2:Ranks/LlWorld.SplitPhasesTwoResultsAliveZeroCopy/R2}" \
      > "$OUT/sanitize_${tool}.log" 2>&1
    note "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_${tool}.log" | tail -1) \
$(grep -cE '^\[       OK \]' "$OUT/sanitize_${tool}.log") tests OK, $(grep -cE '^\[  (FAILED|SKIPPED) ' "$OUT/sanitize_${tool}.log") failed/skipped"
  done
fi

echo "================ summary"
printf '%s\n' "${summary[@]}" | tee "$LOG/summary.txt"
# The device tool returns at most 8 files: the summary, the GPU test log, the logs archive, and the JSON rows (packed
# into one archive when there are more than four).
cp "$LOG"/summary.txt "$LOG"/gpu_tests.log "$RESULT_DIR"/ 2>/dev/null
jsons=("$LOG"/perf_*.json)
if [ -e "${jsons[0]}" ]; then
  if [ ${#jsons[@]} -le 4 ]; then cp "${jsons[@]}" "$RESULT_DIR"/; else tar czf "$RESULT_DIR/perf_json.tgz" -C "$LOG" $(cd "$LOG" && ls perf_*.json); fi
fi
tar czf "$RESULT_DIR/logs.tgz" -C "$LOG" .
