// Dispatch layout (ncclMoeGetDispatchLayout): local, not collective.
//
// For this rank's tokens t < T (topk_idx [T, K], -1 = unused slot; E_l = E / R):
//   num_tokens_per_expert[e] = #{(t, k) : topk_idx[t][k] == e}
//   is_token_in_rank[t][d]   = 1 if some k has topk_idx[t][k] / E_l == d, else 0
//   num_tokens_per_rank[d]   = sum_t is_token_in_rank[t][d]     (a token counts once per rank)
// Same results as ref::get_dispatch_layout. Ids outside [0, E) are treated as unused.
//
// Launch: the counters are zeroed with cudaMemsetAsync (capturable, src/ops/layout.cc), then a grid of
// kLayoutThreads-thread blocks, one token per thread, counts in shared memory and adds the non-zero counts to global
// memory.
#include <cuda_runtime.h>

#include "device/limits.h"
#include "device/routing.cuh"
#include "kernels/layout/layout.h"

namespace nccl_moe {
namespace {

constexpr int kLayoutThreads = 256;

__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(const __grid_constant__ LayoutArgs a) {
  __shared__ int s_expert[kMaxExperts];
  __shared__ int s_rank[kMaxNvlPeers];
  const int E = a.num_experts, R = a.num_ranks, El = E / R;
  for (int i = threadIdx.x; i < E; i += kLayoutThreads) s_expert[i] = 0;
  if (threadIdx.x < kMaxNvlPeers) s_rank[threadIdx.x] = 0;
  __syncthreads();
  const int t = blockIdx.x * kLayoutThreads + threadIdx.x;
  if (t < a.num_tokens) {
    unsigned mask = 0;
    for (int k = 0; k < a.topk; ++k) {
      const int e = dev::load_topk_id_checked(a.comm, Phase::kLayout, a.topk_idx, !a.topk_idx_is_int64,
                                              static_cast<size_t>(t) * a.topk + k, a.topk, E);
      if (e < 0) continue;
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

cudaError_t launchLayout(const LayoutArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  const int blocks = (a.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  layout_kernel<<<blocks, kLayoutThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadLayoutKernels() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, layout_kernel);
}

}  // namespace nccl_moe
