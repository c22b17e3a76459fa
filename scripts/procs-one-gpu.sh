#!/usr/bin/env bash
# N moe-perf processes sharing GPU 0, as an MPI job on a one-GPU machine would run them (correctness only):
#   scripts/procs-one-gpu.sh [--mps] [--procs N] [--timeout S] -- <moe-perf args>
# Every process gets an MPI-style environment (PMI_RANK/PMI_SIZE, MPI_LOCALRANKID=0) and NCCL_HOSTID=vnode<r>, so
# NCCL accepts several ranks on one GPU (one "node" per process, sockets between them); NCCL_MOE_HOSTID is the same
# for all (default "one-gpu"), so NCCL-MoE sees one node and maps its peers through CUDA IPC on the same device.
# --mps runs the MPS control daemon for the duration (as root), so the processes' kernels run concurrently; without
# it they are time-sliced (correct, much slower). Logs: $OUT/procs-one-gpu.r<r>.log (OUT defaults to .); rank 0's
# log is printed. Exit status: the first non-zero status of a process (124: it ran past --timeout).
set -u
mps=0 n=2 limit=120
while [ $# -gt 0 ]; do
  case "$1" in
    --mps) mps=1; shift ;;
    --procs) n=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
out=${OUT:-.}
perf=${MOE_PERF:-build/perf/moe-perf}
[ -x "$perf" ] || { echo "procs-one-gpu: no executable $perf (build first, or set MOE_PERF)" >&2; exit 2; }
mkdir -p "$out"
if [ "$mps" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/nccl-moe-mps-$$ CUDA_MPS_LOG_DIRECTORY=/tmp/nccl-moe-mpslog-$$
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d || { echo "procs-one-gpu: could not start the MPS daemon" >&2; exit 2; }
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
port=$((20000 + $$ % 20000))
pids=()
for ((r = 0; r < n; r++)); do
  PMI_RANK=$r PMI_SIZE=$n MPI_LOCALRANKID=0 NCCL_HOSTID=vnode$r NCCL_MOE_HOSTID=${NCCL_MOE_HOSTID-one-gpu} \
    NCCL_COMM_ID=127.0.0.1:$port timeout "$limit" "$perf" "$@" > "$out/procs-one-gpu.r$r.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  wait "$p"
  s=$?
  [ "$rc" = 0 ] && rc=$s
done
cat "$out/procs-one-gpu.r0.log"
echo "# procs-one-gpu: $n processes on GPU 0$([ "$mps" = 1 ] && echo ' under MPS'), rc=$rc (logs in $out)"
exit "$rc"
