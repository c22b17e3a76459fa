// Kernel arguments of the internode low-latency kernels (dispatch.cu, combine.cu, reset.cu in this folder) and
// their launch functions. Plain, trivially copyable structs passed by value (__grid_constant__); the host
// operations (src/ops/ll_net.cc) fill them from the communicator, the handle's routing and the validated call
// arguments. The results are those of the intranode LL kernels (docs/reference.md "Low-latency dispatch" and
// "combine"), bit for bit; only the way bytes move differs (docs/kernels-ll.md "Internode").
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "device/device_comm.h"
#include "device/limits.h"
#include "mem/ll_net_layout.h"

namespace nccl_moe {

// Grid cap of the internode LL kernels: the rest of the GPU stays free (a software NIC's copies run there, and the
// kernels move little per block: they are bound by the network).
constexpr int kLlNetMaxBlocks = 16;

// What every internode LL kernel needs of the communicator.
struct LlNetComm {
  DeviceComm comm;
  LlNetLayout layout;
  size_t half_offset;  // offset of the net half inside every rank's buffer
  int num_local_experts;
  int num_blocks;                  // grid of the multi-block kernels
  int16_t local_index[kMaxRanks];  // [rank] index on this rank's node (scaleup.buffer), -1 on another node
  uint64_t own_base;               // this rank's buffer as its QPs' lkey window addresses it (the iova)
};

struct LlNetDispatchArgs {
  LlNetComm net;
  const void* x;         // [T, H] bf16
  const void* topk_idx;  // [T, K]
  int idx_int32;
  const float* topk_weights;  // [T, K] or null: carried in the headers for the combine
  int num_tokens, hidden, topk, num_experts;
  int use_fp8, scale_format;
  void* recv_x;           // [E_l, R*max, H] bf16 or fp8
  void* recv_scales;      // [E_l, R*max, G] float or [E_l, R*max, P] int32
  int* recv_count;        // [E_l]
  int* cumulative_stats;  // [E_l] or null
  int* recv_src_info;     // [E_l, R*max]
  int* recv_row;          // [R, max, max_topk]
  int slab_rows;          // R * max (rows of one expert's slab)
};

struct LlNetCombineArgs {
  LlNetComm net;
  const uint16_t* y;     // [E_l, R*max, H] bf16
  const void* topk_idx;  // [T, K]
  int idx_int32;
  const float* topk_weights;  // [T, K] or null: the dispatch headers' weights
  int num_tokens, hidden, topk;
  uint16_t* out;        // [T, H] bf16
  const int* recv_row;  // handle: [R, max, max_topk]
  int slab_rows;
};

// Dispatch: the plan kernel (one block: message positions and counts) then the send kernel; the receive kernel.
cudaError_t launchLlNetDispatchSend(const LlNetDispatchArgs& a, cudaStream_t stream);
cudaError_t launchLlNetDispatchRecv(const LlNetDispatchArgs& a, cudaStream_t stream);
// Combine: [the weight push when given weights] then the send kernel; the receive kernel.
cudaError_t launchLlNetCombineSend(const LlNetCombineArgs& a, cudaStream_t stream);
cudaError_t launchLlNetCombineRecv(const LlNetCombineArgs& a, cudaStream_t stream);
// The reset's barrier over every rank of the communicator (one block; half 0's persist and barrier words).
cudaError_t launchLlNetBarrier(const LlNetComm& net, cudaStream_t stream);

// Load the kernels of each file on the current device (src/ops/load.cc).
cudaError_t loadLlNetDispatchKernels();
cudaError_t loadLlNetCombineKernels();

}  // namespace nccl_moe
