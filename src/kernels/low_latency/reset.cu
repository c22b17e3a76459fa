// Low-latency housekeeping: the handle's routing arrays (llRoutingAlloc / llRoutingFree) and
// ncclMoeLowLatencyReset.
//
// Reset (collective, stream-ordered, with no LL result alive on any rank): a barrier over every rank
// (llResetBarrierKernel: every rank's earlier LL kernels, and the acks and flags they add into peers, are
// done), then zeroes the control, message, weight and partial-sum regions of both halves of this rank's
// buffer (epochs restart at 0, stale message tags are gone), then a second barrier so that no peer writes
// into this rank's LL region before the zeroing is complete. The next LL dispatch uses half 0 again.
// Barrier protocol: rank r adds 1 to persist.reset_flag[r] of every rank (red.release.sys), then waits until
// its own reset_flag[s] >= its reset count for every s. The persist block of half 0 is never zeroed.
#include <cuda_runtime.h>

#include "core/comm.h"
#include "core/error.h"
#include "core/handle.h"
#include "core/ops.h"
#include "kernels/low_latency/common.cuh"

namespace nccl_moe {
namespace {

__global__ void llResetBarrierKernel(DeviceComm comm, LlLayout layout, size_t half0_offset) {
  __shared__ long long s_count;
  __shared__ int s_failed;
  const int tid = threadIdx.x;
  LlPersist* mine = layout.persist(ll::half_of(comm, comm.rank, half0_offset));
  if (tid == 0) {
    s_count = mine->reset_count + 1;
    s_failed = 0;
  }
  __syncthreads();
  if (tid < comm.num_ranks) {
    LlPersist* peer = layout.persist(ll::half_of(comm, tid, half0_offset));
    dev::red_add_release_sys(&peer->reset_flag[comm.rank], 1ll);
    if (!dev::wait_geq(comm, &mine->reset_flag[tid], s_count, Phase::kBarrier, tid)) s_failed = 1;
  }
  __syncthreads();
  if (tid == 0 && !s_failed) mine->reset_count = s_count;
}

}  // namespace

ncclResult_t llRoutingAlloc(ncclMoeComm* comm, LlRouting* routing) {
  const LlLayout& L = comm->layout.ll;
  const size_t src_info = static_cast<size_t>(L.num_local_experts) * L.slab_rows();
  const size_t rows = static_cast<size_t>(L.slab_rows()) * L.topk;
  MOE_CUDA_CHECK(cudaMalloc(&routing->recv_src_info, src_info * sizeof(int)));
  MOE_CUDA_CHECK(cudaMalloc(&routing->recv_row, rows * sizeof(int)));
  MOE_CUDA_CHECK(cudaMemset(routing->recv_src_info, 0xff, src_info * sizeof(int)));
  MOE_CUDA_CHECK(cudaMemset(routing->recv_row, 0xff, rows * sizeof(int)));
  return ncclSuccess;
}

void llRoutingFree(LlRouting* routing) {
  if (routing->recv_src_info != nullptr) cudaFree(routing->recv_src_info);
  if (routing->recv_row != nullptr) cudaFree(routing->recv_row);
  routing->recv_src_info = nullptr;
  routing->recv_row = nullptr;
  routing->valid = false;
}

ncclResult_t opLlReset(ncclMoeComm* comm, cudaStream_t stream) {
  const BufferLayout& B = comm->layout;
  const LlLayout& L = B.ll;
  // Barrier first: every rank's earlier LL kernels have ended (and with them any ack or flag they add to this
  // rank's control region) before the zeroing; without it a peer's late receive ack could land after the
  // memset and survive the reset.
  llResetBarrierKernel<<<1, 32, 0, stream>>>(comm->deviceComm(), L, B.ll_offset);
  MOE_CUDA_CHECK(cudaGetLastError());
  for (int half = 0; half < 2; ++half) {
    uint8_t* base = B.ll_region(comm->buffer, half);
    MOE_CUDA_CHECK(cudaMemsetAsync(base + L.control_offset, 0, L.reset_bytes(), stream));
  }
  llResetBarrierKernel<<<1, 32, 0, stream>>>(comm->deviceComm(), L, B.ll_offset);
  MOE_CUDA_CHECK(cudaGetLastError());
  comm->ll_next_half = 0;
  return ncclSuccess;
}

}  // namespace nccl_moe
