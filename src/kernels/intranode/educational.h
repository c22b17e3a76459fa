// Selection and host entry points of the educational high-throughput kernels (educational.cu): a plain,
// one-role-per-phase version of dispatch.cu / combine.cu with the same contract and buffer protocol.
// opHtDispatch / opHtCombine call these when NCCL_MOE_HT_KERNEL=educational (read on every call).
#pragma once

#include <cuda_runtime.h>

#include "core/ops.h"

namespace nccl_moe {

// True when NCCL_MOE_HT_KERNEL is "educational"; "fast" (the default) or empty selects dispatch.cu /
// combine.cu; any other value warns once and selects them too. Read from the environment on every call.
bool htUseEducationalKernels();

// Same arguments, preconditions (validated by src/core/api.cc) and results as opHtDispatch / opHtCombine.
ncclResult_t opHtDispatchEducational(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeDispatchArgs_t& args,
                                     cudaStream_t stream);
ncclResult_t opHtCombineEducational(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeCombineArgs_t& args,
                                    cudaStream_t stream);

}  // namespace nccl_moe
