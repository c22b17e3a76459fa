// Internode low-latency operations (src/ops/ll_net.cc), called by src/ops/ll.cc on communicators of several nodes
// after it has updated the handle's LL state.
#pragma once

#include <cuda_runtime.h>

#include "core/comm.h"
#include "core/handle.h"
#include "nccl_moe.h"

namespace nccl_moe {

ncclResult_t llNetDispatch(ncclMoeComm* comm, const LlRouting& r, const ncclMoeLLDispatchArgs_t& args, bool do_send,
                           bool do_recv, cudaStream_t stream);
// `y`: the expert outputs (args.x, or the zero-copy combine buffer of the dispatch's LL half).
ncclResult_t llNetCombine(ncclMoeComm* comm, const LlRouting& r, const ncclMoeLLCombineArgs_t& args, const void* y,
                          bool do_send, bool do_recv, cudaStream_t stream);
ncclResult_t llNetReset(ncclMoeComm* comm, cudaStream_t stream);

}  // namespace nccl_moe
