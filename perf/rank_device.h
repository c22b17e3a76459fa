// One rank as moe-perf's GPU backend sees it (device, stream, NCCL communicator) and the NCCL check of the backend.
// CUDA calls are checked with HARNESS_CUDA and device buffers are harness::DeviceArray (tests/harness/device_array.h,
// shared with the tests); every failure is a harness::Error, caught at the top of each rank thread, which then fails
// the run.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <string>

#include "harness/device_array.h"

namespace nccl_moe::perf {

inline std::string ncclFailure(const char* call, ncclResult_t r, const char* file, int line) {
  char buf[768];
  std::snprintf(buf, sizeof(buf), "%s failed: %s (%s) at %s:%d", call, ncclGetErrorString(r), ncclGetLastError(nullptr),
                file, line);
  return buf;
}

#define PERF_NCCL(call)                                                                            \
  do {                                                                                             \
    const ncclResult_t perf_res_ = (call);                                                         \
    if (perf_res_ != ncclSuccess)                                                                  \
      throw ::harness::Error(::nccl_moe::perf::ncclFailure(#call, perf_res_, __FILE__, __LINE__)); \
  } while (0)

using harness::DeviceArray;

// One rank as the GPU backend sees it.
struct RankDevice {
  int rank = 0;
  int num_ranks = 1;
  int device = 0;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
};

}  // namespace nccl_moe::perf
