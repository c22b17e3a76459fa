#!/usr/bin/env bash
# Device-machine session for moe-overlap (docs/overlap.md): is the tuner plugin's SM co-scheduling cap worth it?
# Needs a finished build in ./build (build/perf/overlap/moe-overlap and build/plugin/libnccl-tuner-moe.so).
# Runs moe-overlap three times, logs to $OUT/overlap_<name>.log (NCCL's INIT/TUNING lines, which include the
# tuner's "channel cap" and "capped M times" lines, to $OUT/overlap_<name>.nccl.*.txt), prints the tables last:
#   none        no tuner plugin
#   reserve24   plugin, NCCL_MOE_SM_RESERVE=24   (132-SM H200: 108 free >= 64 channels: cap not binding)
#   reserve120  plugin, NCCL_MOE_SM_RESERVE=120  (cap = 12 channels)
# Environment: OUT (default ./device-out), OVERLAP_ARGS (extra moe-overlap options, e.g. "-n 50 --sms 20").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
# Never use NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
BIN=$PWD/build/perf/overlap/moe-overlap
PLUGIN=$PWD/build/plugin/libnccl-tuner-moe.so   # plugin/CMakeLists.txt: OUTPUT_NAME nccl-tuner-moe
if [ ! -x "$BIN" ]; then
  echo "overlap_session: $BIN missing (perf/CMakeLists.txt needs add_subdirectory(overlap); rebuild ./build)"
  exit 1
fi
[ -f "$PLUGIN" ] || echo "overlap_session: WARNING: $PLUGIN missing: the plugin runs will report 'tuner mapped: none'"

names=(none reserve24 reserve120)
declare -A rcs
run_one() {
  local name=$1; shift
  echo "== moe-overlap: $name"
  env -u NCCL_TUNER_PLUGIN -u NCCL_MOE_SM_RESERVE "$@" \
    NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,TUNING NCCL_DEBUG_FILE="$OUT/overlap_$name.nccl.%h.%p.txt" \
    timeout -k 10 420 "$BIN" --timeout 400 ${OVERLAP_ARGS:-} > "$OUT/overlap_$name.log" 2>&1
  rcs[$name]=$?
  echo "   rc=${rcs[$name]}"
}
run_one none
run_one reserve24 NCCL_TUNER_PLUGIN="$PLUGIN" NCCL_MOE_SM_RESERVE=24
run_one reserve120 NCCL_TUNER_PLUGIN="$PLUGIN" NCCL_MOE_SM_RESERVE=120

for name in "${names[@]}"; do
  log=$OUT/overlap_$name.log
  echo
  echo "================ overlap_$name (rc=${rcs[$name]})"
  if [ "${rcs[$name]}" -eq 0 ] && grep -q '^# moe-overlap:' "$log"; then
    sed -n '/^# moe-overlap:/,$p' "$log"
  else
    tail -25 "$log"
  fi
  # The tuner's own lines (identical lines of different ranks/communicators counted): the cap it chose,
  # how often each communicator consulted it and was capped.
  grep -h 'NCCL-MoE tuner' "$OUT"/overlap_"$name".nccl.*.txt 2>/dev/null | sed -E 's/^.*NCCL-MoE tuner/tuner/;
    s/comm 0x[0-9a-f]+/comm */; s/cudaDev [0-9]+/cudaDev */' | sort | uniq -c | head -8
done
echo
echo "================ overlapped total_us per iteration (lower is better)"
for name in "${names[@]}"; do
  printf '%-12s %s\n' "$name" "$(awk '$1=="overlapped"{print $NF}' "$OUT/overlap_$name.log")"
done
rc=0
for name in "${names[@]}"; do [ "${rcs[$name]}" -eq 0 ] || rc=1; done
exit $rc
