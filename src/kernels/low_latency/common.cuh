// Device helpers shared by the low-latency dispatch and combine kernels: launch shape, the views of one LL half,
// the last-block arrival used to publish flags once every block of a grid is done, and warp scans. Numerics
// (bf16 packing, the FP8 cast) are in src/device/numerics.cuh, the top-k decode in src/device/routing.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/device_comm.h"
#include "device/numerics.cuh"
#include "device/ptx.cuh"
#include "device/routing.cuh"
#include "device/wait.cuh"
#include "mem/ll_layout.h"

namespace nccl_moe {
namespace ll {

constexpr int kThreads = 512;  // threads per block of every LL kernel (16 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 2;  // LL is latency-bound: two blocks per SM keep more work items in flight

// Grid of an LL kernel: every block must be resident at once (blocks wait for each other's flags through the
// peers), so num_sms times the blocks per SM the kernel really achieves (at most kBlocksPerSm, and at most
// max_per_sm). Ranks that share a GPU pass max_per_sm = 1: the grids of all of them then hold at most one block
// per SM in total, which is always resident whatever the mix of kernels on an SM; with two blocks per SM, two
// ranks' grids fill every block slot of the GPU exactly, and an SM that holds one block of each of two different
// kernels (their registers do not fit twice) leaves blocks of both grids waiting for each other's.
template <auto kKernel>
inline int grid_blocks(int num_sms, int max_per_sm) {
  static const int per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 1;
    }
    return n < 1 ? 1 : (n > kBlocksPerSm ? kBlocksPerSm : n);
  }();
  return num_sms * (max_per_sm >= 1 && max_per_sm < per_sm ? max_per_sm : per_sm);
}
// Where one rank's half `half_offset` bytes into its buffer lives, as mapped in this process (the LL kernels run
// on single-node communicators: a rank's local index is its rank).
__device__ __forceinline__ uint8_t* half_of(const DeviceComm& comm, int rank, size_t half_offset) {
  return comm.scaleup.buffer[rank] + half_offset;
}

// The regions of the LL half at `half` (LlLayout gives offsets; these give this process's pointers).
__device__ __forceinline__ LlPersist* persist(const LlLayout& L, uint8_t* half) {
  return reinterpret_cast<LlPersist*>(half + L.persist());
}
__device__ __forceinline__ LlControl* control(const LlLayout& L, uint8_t* half) {
  return reinterpret_cast<LlControl*>(half + L.control());
}
__device__ __forceinline__ long long* expert_ready(const LlLayout& L, uint8_t* half, int local_expert) {
  return reinterpret_cast<long long*>(half + L.expert_ready(local_expert));
}
__device__ __forceinline__ uint8_t* dispatch_msg(const LlLayout& L, uint8_t* half, int src_rank, int token) {
  return half + L.dispatch_msg(src_rank, token);
}
__device__ __forceinline__ float* combine_weights(const LlLayout& L, uint8_t* half, int src_rank) {
  return reinterpret_cast<float*>(half + L.combine_weights(src_rank));
}
__device__ __forceinline__ uint8_t* combine_recv_row(const LlLayout& L, uint8_t* half, int expert_rank, int token) {
  return half + L.combine_recv_row(expert_rank, token);
}

// Called by every thread of every block once the block's work (stores included) is done. Returns true in
// exactly one block, the last to arrive, after every other block's prior accesses are ordered before it (each
// block fences before it arrives, so the last block may publish them to peers with a release store). `sys`:
// fence at system scope (the blocks stored into peers' memory); otherwise at gpu scope (only local stores:
// the last block's own system-scope release then carries the chain to the peers). The counter is back at 0
// afterwards (it is only reused by a later kernel).
__device__ __forceinline__ bool arrive_last_block(int* counter, bool sys) {
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    if (sys)
      dev::fence_acq_rel_sys();
    else
      dev::fence_acq_rel_gpu();
    const int old = dev::atom_add_acq_rel_gpu(counter, 1);
    s_last = (old == static_cast<int>(gridDim.x) - 1);
    if (s_last) *counter = 0;
  }
  __syncthreads();
  return s_last != 0;
}

// Share of kLlArrivalUnits of block b among n arriving blocks (0 <= b < n <= 4095): the n shares sum to
// kLlArrivalUnits, whatever n, so the counter's target does not depend on the peer's grid. 32-bit math (a
// 64-bit division is a call that makes the kernels spill).
__device__ __forceinline__ long long arrival_share(int b, int n) {
  static_assert(kLlArrivalUnits * 4095 <= 0xffffffffll, "32-bit share math");
  const uint32_t u = static_cast<uint32_t>(kLlArrivalUnits), nn = static_cast<uint32_t>(n);
  const uint32_t bb = static_cast<uint32_t>(b);
  return static_cast<long long>((bb + 1) * u / nn - bb * u / nn);
}

// Inclusive warp scan of v.
__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = dev::lane_id();
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += u;
  }
  return v;
}

}  // namespace ll
}  // namespace nccl_moe
