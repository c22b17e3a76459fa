// Dispatch layout (ncclMoeGetDispatchLayout): local, not collective.
//
// For this rank's tokens t < T (topk_idx [T, K], -1 = unused slot; E_l = E / R):
//   num_tokens_per_expert[e] = #{(t, k) : topk_idx[t][k] == e}
//   is_token_in_rank[t][d]   = 1 if some k has topk_idx[t][k] / E_l == d, else 0
//   num_tokens_per_rank[d]   = sum_t is_token_in_rank[t][d]     (a token counts once per rank)
// Same results as ref::get_dispatch_layout. Ids outside [0, E) are treated as unused.
//
// Launch: the counters are zeroed with cudaMemsetAsync (capturable), then a grid of kLayoutThreads-thread
// blocks, one token per thread, counts in shared memory and adds the non-zero counts to global memory.
#include <cuda_runtime.h>

#include "core/ops.h"
#include "kernels/intranode/host.cuh"

namespace nccl_moe {
namespace {

constexpr int kLayoutThreads = 256;
constexpr int kMaxLayoutExperts = 4096;  // ncclMoeConfig_t num_experts limit (api.cc)

struct LayoutKernelArgs {
  const void* topk_idx;
  int topk_idx_is_int64;
  int num_tokens;
  int topk;
  int num_experts;
  int num_ranks;
  int* num_tokens_per_rank;
  int* num_tokens_per_expert;  // may be nullptr
  uint8_t* is_token_in_rank;   // may be nullptr
};

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(const __grid_constant__ LayoutKernelArgs a) {
  __shared__ int s_expert[kMaxLayoutExperts];
  __shared__ int s_rank[kMaxRanks];
  const int E = a.num_experts, R = a.num_ranks, El = E / R;
  for (int i = threadIdx.x; i < E; i += kLayoutThreads) s_expert[i] = 0;
  if (threadIdx.x < kMaxRanks) s_rank[threadIdx.x] = 0;
  __syncthreads();
  const int t = blockIdx.x * kLayoutThreads + threadIdx.x;
  if (t < a.num_tokens) {
    unsigned mask = 0;
    for (int k = 0; k < a.topk; ++k) {
      const size_t i = static_cast<size_t>(t) * a.topk + k;
      const int e = a.topk_idx_is_int64 ? static_cast<int>(static_cast<const long long*>(a.topk_idx)[i])
                                        : static_cast<const int*>(a.topk_idx)[i];
      if (e < 0 || e >= E) continue;
      mask |= 1u << (e / El);
      atomicAdd(&s_expert[e], 1);
    }
    for (int d = 0; d < R; ++d) {
      const int in = (mask >> d) & 1u;
      if (in) atomicAdd(&s_rank[d], 1);
      if (a.is_token_in_rank != nullptr) a.is_token_in_rank[static_cast<size_t>(t) * R + d] = static_cast<uint8_t>(in);
    }
  }
  __syncthreads();
  if (a.num_tokens_per_expert != nullptr)
    for (int e = threadIdx.x; e < E; e += kLayoutThreads)
      if (s_expert[e] != 0) atomicAdd(&a.num_tokens_per_expert[e], s_expert[e]);
  if (threadIdx.x < R && s_rank[threadIdx.x] != 0) atomicAdd(&a.num_tokens_per_rank[threadIdx.x], s_rank[threadIdx.x]);
}

}  // namespace

ncclResult_t opDispatchLayout(ncclMoeComm* comm, const ncclMoeLayoutArgs_t& args, cudaStream_t stream) {
  ht::DeviceGuard guard(comm->device);
  LayoutKernelArgs a{};
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
  if (args.num_tokens == 0) return ncclSuccess;
  const int blocks = (args.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  layout_kernel<<<blocks, kLayoutThreads, 0, stream>>>(a);
  MOE_CUDA_CHECK(cudaGetLastError());
  return ncclSuccess;
}

}  // namespace nccl_moe
