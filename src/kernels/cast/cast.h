// Arguments and launch of the BF16 -> FP8 cast kernel (cast.cu); filled by src/ops/cast.cc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace nccl_moe {

struct CastArgs {
  const uint16_t* x;  // [T, H] bf16
  int num_tokens;
  int hidden;
  int num_groups;  // ceil(H / 128)
  int num_words;   // ceil(groups / 4)
  int format;      // ncclMoeScaleFormat_t
  uint8_t* out;
  float* out_scales;  // float formats: [T, num_groups]
  int* out_packed;    // ue8m0: [T, num_words]
};

// Returns cudaGetLastError(); nothing is launched for num_tokens == 0.
cudaError_t launchCast(const CastArgs& a, cudaStream_t stream);
// Loads the kernel on the current device (src/ops/load.cc).
cudaError_t loadCastKernels();

}  // namespace nccl_moe
