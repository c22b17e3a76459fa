// Internal operations behind the public entry points. src/core/api.cc validates every argument (once, at
// the API boundary) and then calls these; they assume valid input and only launch work.
#pragma once

#include <cuda_runtime.h>

#include "core/comm.h"
#include "core/handle.h"
#include "nccl_moe.h"

namespace nccl_moe {

// src/kernels/layout/
ncclResult_t opDispatchLayout(ncclMoeComm* comm, const ncclMoeLayoutArgs_t& args, cudaStream_t stream);

// src/kernels/intranode/
ncclResult_t htRoutingAlloc(ncclMoeComm* comm, HtRouting* routing);
void htRoutingFree(HtRouting* routing);
ncclResult_t opHtNotify(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeNotifyArgs_t& args, cudaStream_t stream);
ncclResult_t opHtDispatch(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeDispatchArgs_t& args,
                          cudaStream_t stream);
ncclResult_t opHtCombine(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeCombineArgs_t& args,
                         cudaStream_t stream);

// src/kernels/low_latency/
ncclResult_t llRoutingAlloc(ncclMoeComm* comm, LlRouting* routing);
void llRoutingFree(LlRouting* routing);
ncclResult_t opLlDispatch(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLDispatchArgs_t& args,
                          cudaStream_t stream);
ncclResult_t opLlCombine(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLCombineArgs_t& args,
                         cudaStream_t stream);
ncclResult_t opLlCombineBuffer(ncclMoeComm* comm, ncclMoeHandle* handle, void** buffer);
ncclResult_t opLlReset(ncclMoeComm* comm, cudaStream_t stream);

// src/kernels/cast/
ncclResult_t opCastToFp8(const void* x, int num_tokens, int hidden, ncclMoeScaleFormat_t format, void* out_fp8,
                         void* out_scales, cudaStream_t stream);

}  // namespace nccl_moe
