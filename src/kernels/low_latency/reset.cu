// The barrier of ncclMoeLowLatencyReset (the host operation, src/ops/ll.cc, runs barrier, zeroing, barrier).
//
// Reset (collective, stream-ordered, with no LL result alive on any rank): a barrier over every rank
// (ll_reset_barrier_kernel: every rank's earlier LL kernels, and the acks and flags they add into peers, are
// done), then zeroes the control, message, weight and partial-sum regions of both halves of this rank's
// buffer (epochs restart at 0, stale message tags are gone), then a second barrier so that no peer writes
// into this rank's LL region before the zeroing is complete. The next LL dispatch uses half 0 again.
// Barrier protocol: rank r adds 1 to persist.reset_flag[r] of every rank (red.release.sys), then waits until
// its own reset_flag[s] >= its reset count for every s. The persist block of half 0 is never zeroed.
#include <cuda_runtime.h>

#include "kernels/low_latency/args.h"
#include "kernels/low_latency/common.cuh"

namespace nccl_moe {
namespace {

__global__ void ll_reset_barrier_kernel(const __grid_constant__ LlResetArgs a) {
  const DeviceComm& comm = a.comm;
  const LlLayout& layout = a.layout;
  const size_t half0_offset = a.half0_offset;
  __shared__ long long s_count;
  __shared__ int s_failed;
  const int tid = threadIdx.x;
  LlPersist* mine = ll::persist(layout, ll::half_of(comm, comm.rank, half0_offset));
  if (tid == 0) {
    s_count = mine->reset_count + 1;
    s_failed = 0;
  }
  __syncthreads();
  if (tid < comm.num_ranks) {
    LlPersist* peer = ll::persist(layout, ll::half_of(comm, tid, half0_offset));
    dev::red_add_release_sys(&peer->reset_flag[comm.rank], 1ll);
    if (!dev::wait_geq(comm, &mine->reset_flag[tid], s_count, Phase::kBarrier, tid)) s_failed = 1;
  }
  __syncthreads();
  if (tid == 0 && !s_failed) mine->reset_count = s_count;
}

}  // namespace

cudaError_t launchLlResetBarrier(const LlResetArgs& a, cudaStream_t stream) {
  ll_reset_barrier_kernel<<<1, 32, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadLlResetKernels() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, ll_reset_barrier_kernel);
}

}  // namespace nccl_moe
