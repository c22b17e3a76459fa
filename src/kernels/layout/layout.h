// Arguments and launch of the dispatch-layout kernel (layout.cu); filled by src/ops/layout.cc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device/device_comm.h"

namespace nccl_moe {

struct LayoutArgs {
  DeviceComm comm;  // the error record of an id outside [-1, num_experts) (device/routing.cuh)
  const void* topk_idx;
  int topk_idx_is_int64;
  int num_tokens;
  int topk;
  int num_experts;
  int num_ranks;
  int* num_tokens_per_rank;    // [R], zeroed by the caller on the stream first
  int* num_tokens_per_expert;  // [E] or nullptr, zeroed likewise
  uint8_t* is_token_in_rank;   // [T, R] or nullptr
};

// One token per thread; nothing is launched for num_tokens == 0. Returns cudaGetLastError().
cudaError_t launchLayout(const LayoutArgs& a, cudaStream_t stream);
// Loads the kernel on the current device (src/ops/load.cc).
cudaError_t loadLayoutKernels();

}  // namespace nccl_moe
