// Internode high-throughput operations (src/ops/ht_net.cc), called by src/ops/ht.cc on communicators of several
// nodes in place of the intranode launches; src/ops/ht.cc owns the handle's state and the host-count wait.
#pragma once

#include <cuda_runtime.h>

#include "core/comm.h"
#include "core/handle.h"
#include "nccl_moe.h"

namespace nccl_moe {

// host_scratch / host_seq: host-count mode (nullptr / 0 in worst-case mode).
ncclResult_t htNetNotify(ncclMoeComm* comm, const HtRouting& r, const ncclMoeNotifyArgs_t& args, int* host_scratch,
                         int host_seq, cudaStream_t stream);
ncclResult_t htNetDispatch(ncclMoeComm* comm, const HtRouting& r, const ncclMoeDispatchArgs_t& args,
                           cudaStream_t stream);
ncclResult_t htNetCombine(ncclMoeComm* comm, const HtRouting& r, const ncclMoeCombineArgs_t& args, cudaStream_t stream);

}  // namespace nccl_moe
