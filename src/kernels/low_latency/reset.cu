// The barrier of ncclMoeLowLatencyReset (the host operation, src/ops/ll.cc, runs barrier, zeroing, barrier).
//
// Reset (collective, stream-ordered, with no LL result alive on any rank): a barrier over every rank
// (ll_reset_barrier_kernel: every rank's earlier LL kernels, and the acks and flags they add into peers, are
// done), then zeroes the control, message, weight and partial-sum regions of both halves of this rank's
// buffer (epochs restart at 0, stale message tags are gone), then a second barrier so that no peer writes
// into this rank's LL region before the zeroing is complete. The next LL dispatch uses half 0 again.
// Barrier protocol, per pair of ranks: rank r adds 1 to persist.reset_flag[r] of every participant s
// (red.release.sys), then waits until its own reset_flag[s] > reset_seen[s] and counts it in reset_seen[s]. The
// persist block of half 0 is never zeroed. Participants: every rank, or with rank masks the active ones (the new mask
// of ncclMoeSetRankMask, which the barrier kernel stores first, or the current one for ncclMoeLowLatencyReset). Since
// the counts are per pair, a rank left out of some barriers (masked) meets the others again at the next barrier
// that includes it.
#include <cuda_runtime.h>

#include "kernels/low_latency/args.h"
#include "kernels/low_latency/common.cuh"

namespace nccl_moe {
namespace {

__global__ void ll_reset_barrier_kernel(const __grid_constant__ LlResetArgs a) {
  const DeviceComm& comm = a.comm;
  const LlLayout& layout = a.layout;
  const size_t half0_offset = a.half0_offset;
  const int tid = threadIdx.x;
  LlPersist* mine = ll::persist(layout, ll::half_of(comm, comm.rank, half0_offset));
  if (tid >= comm.num_ranks) return;
  bool participant = true;
  if (comm.rank_mask != nullptr) {
    if (a.write_mask) comm.rank_mask[tid] = static_cast<int>((a.new_masked_bits >> tid) & 1u);
    participant = tid == comm.rank || !dev::rank_masked(comm, tid);
  }
  if (!participant) return;
  LlPersist* peer = ll::persist(layout, ll::half_of(comm, tid, half0_offset));
  dev::red_add_release_sys(&peer->reset_flag[comm.rank], 1ll);
  const long long target = mine->reset_seen[tid] + 1;
  if (dev::wait_geq(comm, &mine->reset_flag[tid], target, Phase::kBarrier, tid)) mine->reset_seen[tid] = target;
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
