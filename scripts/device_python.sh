#!/usr/bin/env bash
# The Python package on a GPU machine, in one short run (about 4 minutes on 16 cores, the build included):
#   1. build + install: `pip install --no-build-isolation --no-deps ./python` (library + extension only, kernels for
#      sm_90a, all cores, ccache when present; no tests, moe-perf or plugin: python/CMakeLists.txt turns them off);
#   2. a smoke import (torch + nccl_moe + one CUDA context, lazy kernel loading) from outside the checkout;
#   3. the GPU tests, one pytest process per file (-m gpu), each bounded by `timeout` and by what is left of the
#      budget, with junit XML and -rA output; faulthandler dumps every thread's stack when a test hangs;
#   4. python/benchmarks/overhead.py, bounded (its time is reserved before the tests start);
#   5. the CPU stand-in tests (-m "not gpu") when time is left;
#   then a short summary (pass/fail/skip per file). Run from anywhere; it works in the repository root.
#
#   scripts/device_python.sh
# Environment: OUT (output folder, default ./device-out), PYTHON (default python3), BUDGET_S (whole run, default
#   230), BENCH_S (benchmark bound, default 30), TEST_FILES (default below, in this order), PYTEST_X=0 (do not stop a
#   file at its first failure), SKIP_BUILD=1 (use the installed package), NCCL_MOE_TIMEOUT_S (default 20),
#   PYTEST_TIMEOUT_S (per test, default 45), FAULTHANDLER_S (stack dump of every thread after, default 30).
# Results in $OUT: summary.txt, logs.tgz (every log and junit file), overhead.json (the device tool returns at most
# 8 files). They are refreshed after every stage, so a run stopped by a time limit still returns what it did.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T_START=$(date +%s)
RESULT_DIR=${OUT:-$PWD/device-out}
mkdir -p "$RESULT_DIR"
RESULT_DIR=$(cd "$RESULT_DIR" && pwd)
LOG=$(mktemp -d)
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-230}
BENCH_S=${BENCH_S:-30}
# file:cap (seconds; a file also gets no more than what is left of the budget after the benchmark's share)
TEST_FILES=${TEST_FILES:-"test_ht:45 test_ll:45 test_dist:45 test_gpu:45 test_deep_ep:35 test_autograd:30 test_order:25 test_rank_mask:30"}

# Never NVLink multicast on shared machines; a failing device wait ends in 20 s, not 100.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NCCL_MOE_TIMEOUT_S=${NCCL_MOE_TIMEOUT_S:-20}
# One-process worlds (several ranks on GPU 0): hardware queues of their own, kernels loaded at context creation
# (include/nccl_moe.h, ncclMoeCommInitAll). python/tests/conftest.py sets the same defaults.
export CUDA_DEVICE_MAX_CONNECTIONS=32 CUDA_MODULE_LOADING=EAGER
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH=/usr/local/cuda/bin:$PATH
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1

summary=()
note() { summary+=("$1"); echo "== $1"; }
elapsed() { echo $(( $(date +%s) - T_START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
snapshot() {
  printf '%s\n' "${summary[@]}" > "$RESULT_DIR/summary.txt"
  tar czf "$RESULT_DIR/logs.tgz" -C "$LOG" . 2>/dev/null
  [ -f "$LOG/overhead.json" ] && cp "$LOG/overhead.json" "$RESULT_DIR/"
  return 0
}

{ nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv; "$PY" -V
  # Versions without importing torch (that costs seconds; the smoke step imports it).
  "$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
out = []
for p in ("torch", "nvidia-nccl-cu13", "nanobind", "scikit-build-core", "pytest", "pytest-timeout"):
    try:
        out.append(f"{p} {version(p)}")
    except PackageNotFoundError:
        out.append(f"{p} missing")
print(", ".join(out))
EOF
  command -v ccache ninja cmake nvcc; } > "$LOG/env.txt" 2>&1
cat "$LOG/env.txt"
note "machine: $(nvidia-smi -L 2>/dev/null | head -1 | cut -c1-60); $(nproc) cores; $(grep -E '^torch' "$LOG/env.txt" | cut -c1-150)"
HAVE_PYTEST=1
"$PY" -c "import pytest" 2>/dev/null || HAVE_PYTEST=0

# -- 1. build + install ----------------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  t0=$(date +%s)
  # scikit-build-core: Release, sm_90a only (the default of NCCL_MOE_CUDA_ARCHS, pinned here), build folder
  # python/build/<tag> kept for a second run. -v shows the compiler lines in build.log.
  if timeout 200 "$PY" -m pip install -v --no-build-isolation --no-deps \
       -C cmake.build-type=Release -C cmake.define.NCCL_MOE_CUDA_ARCHS=90a ./python > "$LOG/build.log" 2>&1; then
    note "build+install: ok in $(( $(date +%s) - t0 )) s (-j$(nproc)$(command -v ccache >/dev/null && echo ', ccache'))"
  else
    note "build+install: FAILED after $(( $(date +%s) - t0 )) s (build.log)"
    grep -E "error|Error|FAILED" "$LOG/build.log" | head -30
    tail -20 "$LOG/build.log"
    snapshot; exit 1
  fi
fi
snapshot

# -- 2. smoke: the installed package (from /, so python/nccl_moe cannot shadow it) and one CUDA context -----------------
t0=$(date +%s)
# Lazy kernel loading here (one process, no peer): the tests' processes pay for EAGER loading themselves.
(cd / && CUDA_MODULE_LOADING=LAZY timeout 60 "$PY" - > "$LOG/smoke.log" 2>&1 <<'EOF'
import time
t = time.time()
import torch, nccl_moe, nccl_moe.torch, nccl_moe.deep_ep
t_import = time.time() - t
t = time.time()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
t_ctx = time.time() - t
print("nccl_moe", nccl_moe.__file__, "library", nccl_moe.library_version(), "nccl", nccl_moe.nccl_version(),
      nccl_moe.libnccl_path())
print(f"import {t_import:.1f} s, CUDA context {t_ctx:.1f} s, "
      f"{torch.cuda.get_device_name(0)}, {torch.cuda.mem_get_info()[0] >> 30} GiB free")
EOF
)
rc=$?
cat "$LOG/smoke.log" | tail -5
if [ $rc -ne 0 ]; then
  note "smoke import: FAILED rc=$rc (smoke.log): $(tail -1 "$LOG/smoke.log" | cut -c1-200)"
else
  note "smoke import: ok ($(tail -1 "$LOG/smoke.log" | cut -c1-120))"
fi
snapshot

# -- 3. GPU tests, one process per file -------------------------------------------------------------------------------
count_junit() {  # "passed P failed F errors E skipped S" from a junit file
  "$PY" - "$1" <<'EOF' 2>/dev/null || echo "no junit"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"passed {n['tests'] - n['failures'] - n['errors'] - n['skipped']} failed {n['failures']} "
      f"errors {n['errors']} skipped {n['skipped']}")
EOF
}

XFLAG="-x"
[ "${PYTEST_X:-1}" = 0 ] && XFLAG=""
# pytest-timeout (in the GPU image): a test past 45 s fails in the main thread (signal method: the junit report is
# still written; LocalWorld's rank threads are daemons, so a stuck one does not keep the process alive).
TIMEOUT_FLAGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_FLAGS=(--timeout="${PYTEST_TIMEOUT_S:-45}" --timeout-method=signal)
if [ $HAVE_PYTEST = 0 ]; then
  note "tests: pytest is not installed for $PY (no network here): GPU tests not run"
else
  for entry in $TEST_FILES; do
    f=${entry%%:*}
    cap=${entry#*:}
    [ "$cap" = "$entry" ] && cap=60
    avail=$(( $(left) - BENCH_S - 5 ))
    if [ $avail -lt 15 ]; then
      note "$f: not run (budget spent: $(elapsed) s of $BUDGET_S)"; continue
    fi
    bound=$avail
    [ $bound -gt "$cap" ] && bound=$cap
    t0=$(date +%s)
    # SIGINT first (pytest then writes its report and junit), SIGKILL 10 s later. faulthandler_timeout dumps every
    # thread's stack (rank threads included) when one test runs past it.
    timeout -s INT -k 10 "$bound" "$PY" -m pytest "python/tests/$f.py" -m gpu -v -rA $XFLAG -p no:cacheprovider \
      -o faulthandler_timeout="${FAULTHANDLER_S:-30}" ${TIMEOUT_FLAGS[@]+"${TIMEOUT_FLAGS[@]}"} --junitxml="$LOG/junit_$f.xml" \
      > "$LOG/$f.log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    extra=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && extra=" TIMED OUT at ${bound} s"
    last=$(grep -E '^(=+ .*(passed|failed|error|skipped).* =+)$' "$LOG/$f.log" | tail -1 | tr -d '=' | cut -c1-100)
    note "$f: rc=$rc in ${dt} s$extra: $(count_junit "$LOG/junit_$f.xml") |$last"
    # The first failures, short, into the summary too (the full text is in $f.log inside logs.tgz).
    while IFS= read -r line; do summary+=("    $line"); echo "    $line"; done \
      < <(grep -E '^(FAILED|ERROR) ' "$LOG/$f.log" | head -3 | cut -c1-200)
    snapshot
  done
fi

# -- 4. overhead benchmark ----------------------------------------------------------------------------------------------
t0=$(date +%s)
# One rank, no peer: lazy kernel loading is safe here and starts faster.
(cd / && CUDA_MODULE_LOADING=LAZY timeout -k 5 "$BENCH_S" "$PY" "$ROOT/python/benchmarks/overhead.py" \
  --json "$LOG/overhead.json") > "$LOG/overhead.log" 2>&1
rc=$?
tail -10 "$LOG/overhead.log"
note "overhead.py: rc=$rc in $(( $(date +%s) - t0 )) s"
while IFS= read -r line; do summary+=("  $line"); done < <(grep -E '^(ll_|ht_)' "$LOG/overhead.log")
snapshot

# -- 5. the CPU stand-in (sim backend) with torch, if time is left ------------------------------------------------------
if [ $HAVE_PYTEST = 1 ] && [ "$(left)" -gt 25 ]; then
  t0=$(date +%s)
  timeout -s INT -k 5 $(( $(left) - 5 )) "$PY" -m pytest python/tests -m "not gpu" -q -rfE -p no:cacheprovider \
    --junitxml="$LOG/junit_cpu.xml" > "$LOG/cpu.log" 2>&1
  note "cpu/sim tests (-m 'not gpu'): rc=$? in $(( $(date +%s) - t0 )) s: $(count_junit "$LOG/junit_cpu.xml")"
  while IFS= read -r line; do summary+=("    $line"); echo "    $line"; done \
    < <(grep -E '^(FAILED|ERROR) ' "$LOG/cpu.log" | head -3 | cut -c1-200)
fi

note "total: $(elapsed) s"
snapshot
echo "================ summary"
printf '%s\n' "${summary[@]}"
