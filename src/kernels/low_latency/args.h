// Kernel arguments of the low-latency kernels (dispatch.cu, combine.cu, reset.cu) and their launch functions.
// Plain, trivially copyable structs passed by value (__grid_constant__); the host operations (src/ops/ll.cc)
// fill them from the communicator, the handle's routing and the validated call arguments.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "device/device_comm.h"
#include "mem/ll_layout.h"

namespace nccl_moe {

struct LlDispatchArgs {
  DeviceComm comm;
  LlLayout layout;
  size_t half_offset;     // offset of the LL half inside every rank's buffer
  int num_sms;            // SMs this rank may occupy: the grid fills them (every block resident at once)
  int max_blocks_per_sm;  // cap of blocks per SM (1: ranks share the GPU, see ll::grid_blocks)
  const void* x;          // [T, H] bf16
  const void* topk_idx;   // [T, K]
  int idx_int32;
  int num_tokens, hidden, topk;
  int use_fp8, scale_format;
  void* recv_x;               // [E_l, R*max, H] bf16 or fp8
  void* recv_scales;          // [E_l, R*max, G] float or [E_l, R*max, P] int32
  int* recv_count;            // [E_l]
  int* cumulative_stats;      // [E_l] or null
  int* recv_src_info;         // [E_l, R*max]
  int* recv_row;              // [R, max, max_topk]
  const float* topk_weights;  // [T, K] or null: copied into the message headers for the combine
  int do_send, do_recv;
  unsigned long long* trace;  // [grid][kLlTracePoints] or null (diagnostics, trace.h)
};

struct LlCombineArgs {
  DeviceComm comm;
  LlLayout layout;
  size_t half_offset;
  int num_sms;            // SMs this rank may occupy: the grid fills them (every block resident at once)
  int max_blocks_per_sm;  // cap of blocks per SM (1: ranks share the GPU, see ll::grid_blocks)
  const uint16_t* y;      // [E_l, R*max, H] bf16
  const void* topk_idx;   // [T, K]
  int idx_int32;
  const float* topk_weights;  // [T, K], or null: the weights the dispatch carried in its message headers
  int num_tokens, hidden, topk;
  uint16_t* out;        // [T, H] bf16
  const int* recv_row;  // handle: [R, max, max_topk]
  int do_send, do_recv;
};

struct LlResetArgs {
  DeviceComm comm;
  LlLayout layout;
  size_t half0_offset;  // offset of LL half 0 (its persist block holds the reset barrier's counters)
  // The ranks of the barrier: with rank masks, those active in the mask (the new one with write_mask, else the one
  // in comm.rank_mask when the barrier runs); every rank without masks.
  int write_mask;  // 1: store new_masked_bits into comm.rank_mask (bit r: rank r masked) before the barrier
  uint32_t new_masked_bits;
};

// Launch on `stream`, return cudaGetLastError(). Dispatch and combine: up to max_blocks_per_sm (at most
// kBlocksPerSm, as many as the kernel's occupancy allows) blocks per SM on num_sms SMs. The reset barrier: one warp.
cudaError_t launchLlDispatch(const LlDispatchArgs& a, cudaStream_t stream);
cudaError_t launchLlCombine(const LlCombineArgs& a, cudaStream_t stream);
cudaError_t launchLlResetBarrier(const LlResetArgs& a, cudaStream_t stream);

// Load the kernels of each file on the current device (src/ops/load.cc).
cudaError_t loadLlDispatchKernels();
cudaError_t loadLlCombineKernels();
cudaError_t loadLlResetKernels();

}  // namespace nccl_moe
