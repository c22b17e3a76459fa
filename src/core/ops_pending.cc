// Weak fallbacks for operations whose kernels are not linked into this build. A strong definition in
// src/kernels/ replaces each one; what remains answers ncclInvalidUsage "not implemented yet", honestly
// (README.md lists what is implemented).
#include "core/error.h"
#include "core/ops.h"

#define MOE_PENDING(api) \
  ::nccl_moe::setLastError(ncclInvalidUsage, "%s: not implemented yet in this build of NCCL-MoE", api)

namespace nccl_moe {

__attribute__((weak)) ncclResult_t opDispatchLayout(ncclMoeComm*, const ncclMoeLayoutArgs_t&, cudaStream_t) {
  return MOE_PENDING("ncclMoeGetDispatchLayout");
}
__attribute__((weak)) ncclResult_t htRoutingAlloc(ncclMoeComm*, HtRouting*) { return ncclSuccess; }
__attribute__((weak)) void htRoutingFree(HtRouting*) {}
__attribute__((weak)) ncclResult_t opHtNotify(ncclMoeComm*, ncclMoeHandle*, const ncclMoeNotifyArgs_t&, cudaStream_t) {
  return MOE_PENDING("ncclMoeDispatchNotify");
}
__attribute__((weak)) ncclResult_t opHtDispatch(ncclMoeComm*, ncclMoeHandle*, const ncclMoeDispatchArgs_t&,
                                                cudaStream_t) {
  return MOE_PENDING("ncclMoeDispatch");
}
__attribute__((weak)) ncclResult_t opHtCombine(ncclMoeComm*, ncclMoeHandle*, const ncclMoeCombineArgs_t&,
                                               cudaStream_t) {
  return MOE_PENDING("ncclMoeCombine");
}
__attribute__((weak)) ncclResult_t llRoutingAlloc(ncclMoeComm*, LlRouting*) { return ncclSuccess; }
__attribute__((weak)) void llRoutingFree(LlRouting*) {}
__attribute__((weak)) ncclResult_t opLlDispatch(ncclMoeComm*, ncclMoeHandle*, const ncclMoeLLDispatchArgs_t&,
                                                cudaStream_t) {
  return MOE_PENDING("ncclMoeLowLatencyDispatch");
}
__attribute__((weak)) ncclResult_t opLlCombine(ncclMoeComm*, ncclMoeHandle*, const ncclMoeLLCombineArgs_t&,
                                               cudaStream_t) {
  return MOE_PENDING("ncclMoeLowLatencyCombine");
}
__attribute__((weak)) ncclResult_t opLlCombineBuffer(ncclMoeComm*, ncclMoeHandle*, void**) {
  return MOE_PENDING("ncclMoeLowLatencyCombineBuffer");
}
__attribute__((weak)) ncclResult_t opLlReset(ncclMoeComm*, cudaStream_t) {
  return MOE_PENDING("ncclMoeLowLatencyReset");
}
__attribute__((weak)) ncclResult_t opCastToFp8(const void*, int, int, ncclMoeScaleFormat_t, void*, void*,
                                               cudaStream_t) {
  return MOE_PENDING("ncclMoeCastToFp8");
}

}  // namespace nccl_moe
