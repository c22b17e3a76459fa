// The sizes every buffer region is derived from: one per communicator, equal on all ranks.
#pragma once

#include <cuda_runtime.h>  // __host__ __device__ for host compilers too

#include <cstddef>
#include <cstdint>

namespace nccl_moe {

struct LayoutParams {
  int num_ranks;
  int num_experts;
  int hidden;  // largest H (elements)
  int max_topk;
  int ht_tokens;      // high-throughput capacity per rank (0 = no HT region)
  int ll_tokens;      // low-latency capacity per rank (0 = no LL region)
  int num_nodes = 1;  // nodes of the communicator: several add the internode LL region (src/mem/ll_net_layout.h)
  int num_local_experts() const { return num_experts / num_ranks; }
};

__host__ __device__ constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }
__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

constexpr int kScaleGroupElems = 128;  // FP8: one scale per 128 channels
constexpr size_t kRegionAlign = 4096;  // every region starts on a 4 KiB boundary

}  // namespace nccl_moe
