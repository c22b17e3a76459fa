// Error reporting inside the library: one checking macro per foreign API (CUDA runtime, CUDA driver, NCCL,
// hwloc, verbs) turning a failure into an ncclResult_t plus a message naming the call, the code and its text.
// Messages land in the per-thread last-error string (and the communicator's, where one is in scope) that
// ncclMoeGetLastError() returns. Nothing here aborts the process.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdarg>
#include <string>

namespace nccl_moe {

// Records `message` as the calling thread's last error and returns `result` (so callers can `return`).
ncclResult_t setLastError(ncclResult_t result, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
const char* threadLastError();
void clearThreadLastError();

}  // namespace nccl_moe

// Evaluates a CUDA runtime call; on failure records "<call> failed: <name> (<text>) at file:line" and returns
// ncclUnhandledCudaError from the enclosing function.
#define MOE_CUDA_CHECK(call)                                                                                         \
  do {                                                                                                               \
    cudaError_t moe_err_ = (call);                                                                                   \
    if (moe_err_ != cudaSuccess) {                                                                                   \
      return ::nccl_moe::setLastError(ncclUnhandledCudaError, "%s failed: %s (%s) at %s:%d", #call,                  \
                                      cudaGetErrorName(moe_err_), cudaGetErrorString(moe_err_), __FILE__, __LINE__); \
    }                                                                                                                \
  } while (0)

#define MOE_NCCL_CHECK(call)                                                                                        \
  do {                                                                                                              \
    ncclResult_t moe_res_ = (call);                                                                                 \
    if (moe_res_ != ncclSuccess && moe_res_ != ncclInProgress) {                                                    \
      return ::nccl_moe::setLastError(moe_res_, "%s failed: %s (%s) at %s:%d", #call, ncclGetErrorString(moe_res_), \
                                      ncclGetLastError(nullptr), __FILE__, __LINE__);                               \
    }                                                                                                               \
  } while (0)

// Propagates an ncclResult_t from an internal function (the message is already recorded).
#define MOE_CHECK(call)                           \
  do {                                            \
    ncclResult_t moe_res_ = (call);               \
    if (moe_res_ != ncclSuccess) return moe_res_; \
  } while (0)

// Argument check at the API boundary: returns ncclInvalidArgument with a message naming the argument.
#define MOE_ARG_CHECK(cond, ...)                                                    \
  do {                                                                              \
    if (!(cond)) return ::nccl_moe::setLastError(ncclInvalidArgument, __VA_ARGS__); \
  } while (0)
