#!/usr/bin/env bash
# Runs a list of steps on the device machine against a build carried from the CPU machine, each bounded by its
# own timeout and all of them by a deadline, logs to $OUT (or ./device-out). For calls that verify a few chosen
# things (scripts/device_session.sh is the full session: configure, build, suite, moe-perf).
#
#   scripts/device_steps.sh STEPS_FILE
#
# STEPS_FILE: one step per line, `name | timeout_s | command` (blank lines and lines starting with # skipped).
# The command runs with bash in the repository root; `build` resolves to the carried build. A step that would
# start after DEADLINE_S seconds (default 560) is skipped and said so, so the call returns with its logs before
# the device tool's limit. Each step's output goes to $OUT/<name>.log; $OUT/summary.txt gets one line per step:
# rc, seconds, and the log's last line. Environment: CARRIED_BUILD (default build-carry), DEADLINE_S.
set -uo pipefail
cd "$(dirname "$0")/.."
steps_file=${1:?usage: scripts/device_steps.sh STEPS_FILE}
RESULT_DIR=${OUT:-$PWD/device-out}
mkdir -p "$RESULT_DIR"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PATH=/usr/local/cuda/bin:$PATH
deadline=${DEADLINE_S:-560}
start=$SECONDS
summary="$RESULT_DIR/summary.txt"
: > "$summary"

carried=${CARRIED_BUILD:-build-carry}
if [ -f "$carried/CMakeCache.txt" ]; then
  # The carried folder names the source and build folders of the machine it was built on: make them resolve.
  origin=$(sed -n 's/^CMAKE_CACHEFILE_DIR:INTERNAL=//p' "$carried/CMakeCache.txt")
  root=$(dirname "$origin")
  if [ -n "$origin" ] && [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then
    mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"
  fi
  # The build folder's own name there (e.g. build-h200) points at the carried copy here.
  base=$(basename "$origin")
  if [ -n "$origin" ] && [ "$base" != "$carried" ] && [ "$base" != build ]; then
    rm -rf "./$base" && ln -sfn "$carried" "./$base"
  fi
  rm -rf build && ln -sfn "$carried" build
fi
nvidia-smi --query-gpu=index,name,clocks.sm,memory.used --format=csv,noheader >> "$summary" 2>&1

while IFS= read -r line || [ -n "$line" ]; do
  case "$line" in '' | '#'*) continue ;; esac
  name=$(echo "${line%%|*}" | xargs)
  rest=${line#*|}
  limit=$(echo "${rest%%|*}" | xargs)
  cmd=${rest#*|}
  elapsed=$((SECONDS - start))
  if [ $((elapsed + 10)) -ge "$deadline" ]; then
    echo "$name: skipped (deadline ${deadline}s, ${elapsed}s used)" | tee -a "$summary"
    continue
  fi
  left=$((deadline - elapsed))
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $cmd"
  t0=$SECONDS
  timeout -k 5 "$limit" bash -c "$cmd" > "$RESULT_DIR/$name.log" 2>&1
  rc=$?
  last=$(grep -v '^\s*$' "$RESULT_DIR/$name.log" | tail -1 | cut -c1-160)
  echo "$name: rc $rc, $((SECONDS - t0)) s; $last" | tee -a "$summary"
done < "$steps_file"
echo "total $((SECONDS - start)) s" | tee -a "$summary"
