// Communicator lifetime internals used by api.cc (src/core/comm.cc).
#pragma once

#include "core/comm.h"

namespace nccl_moe {

// Collective init over `nccl`; on failure the caller releases with releaseCommResources(). `args_status` is
// the caller's check of the arguments: when it failed (its message in the thread's last error), this rank
// still joins the identity exchange with that status, so the other ranks fail too instead of waiting.
ncclResult_t commInit(ncclMoeComm* comm, ncclComm_t nccl, const ncclMoeConfig_t& config, ncclResult_t args_status);
// Collective: synchronise the device, barrier with every rank, release everything.
ncclResult_t commDestroy(ncclMoeComm* comm);
void releaseCommResources(ncclMoeComm* comm);
// An NCCL all-reduce of one int on the internal stream, synchronised: all ranks have reached this point.
ncclResult_t ncclBarrier(ncclMoeComm* comm);
// All-reduce (max) of a local failure flag: *any_failed = 1 when some rank failed. Collective.
ncclResult_t ncclAgree(ncclMoeComm* comm, int local_failed, int* any_failed);

}  // namespace nccl_moe
