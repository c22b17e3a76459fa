// ncclMoeGetDispatchLayout: zero the counters (stream-ordered, capturable), then the layout kernel.
#include "kernels/layout/layout.h"

#include "core/device_guard.h"
#include "core/error.h"
#include "ops/ops.h"

namespace nccl_moe {

ncclResult_t opDispatchLayout(ncclMoeComm* comm, const ncclMoeLayoutArgs_t& args, cudaStream_t stream) {
  const DeviceGuard guard(comm->device);
  LayoutArgs a{};
  a.comm = comm->deviceComm();
  a.topk_idx = args.topk_idx;
  a.topk_idx_is_int64 = args.topk_idx_type == ncclMoeIndexInt64 ? 1 : 0;
  a.num_tokens = args.num_tokens;
  a.topk = args.topk;
  a.num_experts = comm->config.num_experts;
  a.num_ranks = comm->num_ranks;
  a.num_tokens_per_rank = args.num_tokens_per_rank;
  a.num_tokens_per_expert = args.num_tokens_per_expert;
  a.is_token_in_rank = args.is_token_in_rank;
  MOE_CUDA_CHECK(cudaMemsetAsync(a.num_tokens_per_rank, 0, sizeof(int) * a.num_ranks, stream));
  if (a.num_tokens_per_expert != nullptr)
    MOE_CUDA_CHECK(cudaMemsetAsync(a.num_tokens_per_expert, 0, sizeof(int) * a.num_experts, stream));
  MOE_CUDA_CHECK(launchLayout(a, stream));
  return ncclSuccess;
}

}  // namespace nccl_moe
