// Index plans of the NCCL all-to-all baseline (and of its CPU twin): which rows each rank gathers, sends, receives
// and where it puts or reduces them, for the same routing as the MoE operation. Built on the host from the CPU
// reference's routing-only dispatch; the permutation kernels and the CPU baseline only follow these indices.
//
// HT (one row per (token, destination rank)):
//   dispatch at s: send row i = x[send_tokens[i]], grouped by destination d ascending, tokens ascending inside a
//     group. Rank d receives the group of s at recv_offsets[s]: the receive buffer is then in MoE receive order
//     (source rank ascending, token ascending), i.e. equal to ncclMoeDispatch's recv_x.
//   combine: rank d sends back its [N_d, H] rows unchanged (already grouped by source); rank s receives d's group at
//     send_offsets[d] (same order it sent), and out[t] = sum over d ascending of row combine_rows[t * R + d] (FP32,
//     bf16 result; -1 = not sent to d), exactly ref::ht_combine's order.
// LL (one row per valid (token, slot)):
//   dispatch at s: send rows grouped by destination d, then local expert j ascending, then token ascending;
//     rank d receives s's group at recv_offsets[s] and scatters received row i to slab position recv_slab_rows[i]
//     (j * slab_rows + row of ref::LlDispatch::send_row), i.e. ref::ll_dispatch's layout.
//   combine at d: gather rows recv_slab_rows[i] of the expert outputs (the inverse of the scatter) and send group s
//     back; rank s receives d's group at send_offsets[d] in the order it sent it, and
//     out[t] = ref::ll_combine's two-level sum: per expert rank an fmaf chain over its slots k ascending rounded to
//     bf16, then those parts added in FP32, ranks ascending.
#pragma once

#include <vector>

#include "reference/reference.h"

namespace nccl_moe::perf {

struct HtPlan {
  int rank = 0, num_ranks = 0, num_tokens = 0;
  std::vector<int> send_counts, send_offsets;  // [R], [R + 1]
  std::vector<int> send_tokens;                // [send_offsets[R]]
  std::vector<int> recv_counts, recv_offsets;  // [R], [R + 1]
  std::vector<int> combine_rows;               // [T * R]
};
HtPlan makeHtPlan(const ref::HtDispatch& dispatch, int rank);

struct LlPlan {
  int rank = 0, num_ranks = 0, num_tokens = 0, topk = 0, num_local_experts = 0, slab_rows = 0;
  std::vector<int> send_counts, send_offsets;  // [R], [R + 1]
  std::vector<int> send_tokens;                // [send_offsets[R]]
  std::vector<int> recv_counts, recv_offsets;  // [R], [R + 1]
  std::vector<int> recv_slab_rows;             // [recv_offsets[R]]
  std::vector<int> combine_rows;               // [T * K]
};
LlPlan makeLlPlan(const ref::Routing& routing, const ref::LlDispatch& dispatch, int rank);

}  // namespace nccl_moe::perf
