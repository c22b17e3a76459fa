// What the send and receive roles of the low-latency dispatch share (dispatch.cu includes the roles:
// dispatch_send.cuh, dispatch_recv.cuh): the block's receive index and the diagnostic trace hook.
#pragma once

#include "kernels/low_latency/args.h"
#include "kernels/low_latency/common.cuh"
#include "kernels/low_latency/trace.h"

namespace nccl_moe {
namespace ll_dispatch {

// The block's index in the receive roles (experts, teams, arrival shares). In a Both kernel it counts from the
// grid's last block: with T <= grid / 2 the blocks that scan and place headers are not the ones waiting for the
// release of their own sends (2 H200, 128 tokens: dispatch 16.2 -> 15.5 us; 4 H200: 21.2 us). A receive-only
// kernel counts from block 0, the first blocks to start.
__device__ __forceinline__ int receive_index(const LlDispatchArgs& p) {
  return p.do_send ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
}

// Stores the time of `point` for this block when tracing (thread 0 only).
__device__ __forceinline__ void trace_at(const LlDispatchArgs& p, int point) {
  if (p.trace != nullptr && threadIdx.x == 0)
    p.trace[static_cast<size_t>(blockIdx.x) * kLlTracePoints + point] = dev::globaltimer_ns();
}

}  // namespace ll_dispatch
}  // namespace nccl_moe
