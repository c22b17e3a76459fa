// Brute-force model of the reference operations (ref::brute), for tests and moe-perf's CPU verification: a second
// implementation of get_dispatch_layout, ht_dispatch/ht_combine and ll_dispatch/ll_combine written the simplest way
// (pull per receiving rank, linear searches), so comparing it field by field with reference.h's functions
// cross-checks them. Not part of the reference's contract (reference.h).
#pragma once

#include <cstdint>
#include <vector>

#include "reference/reference.h"

namespace nccl_moe::ref {

// Same signatures (ll_dispatch without cumulative_stats) and exactly the same output shapes as reference.h's
// functions, so tests compare the two field by field (diff() in reference/testing/compare.h).
namespace brute {
DispatchLayout get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int topk, int num_experts, int num_ranks);
HtDispatch ht_dispatch(const Routing& routing, int expert_alignment, const std::vector<Rows>* x = nullptr);
HtCombineResult ht_combine(const HtDispatch& dispatch, const std::vector<std::vector<uint16_t>>& x, int hidden,
                           const std::vector<std::vector<float>>* weights = nullptr,
                           const std::vector<std::vector<uint16_t>>* bias0 = nullptr,
                           const std::vector<std::vector<uint16_t>>* bias1 = nullptr);
// The two-level order of ref::ht_combine_nodes, computed by searching every receive list for (s, t) and grouping
// the holders by node.
HtCombineResult ht_combine_nodes(const HtDispatch& dispatch, const NodeMap& nodes,
                                 const std::vector<std::vector<uint16_t>>& x, int hidden,
                                 const std::vector<std::vector<float>>* weights = nullptr,
                                 const std::vector<std::vector<uint16_t>>* bias0 = nullptr,
                                 const std::vector<std::vector<uint16_t>>* bias1 = nullptr);
LlDispatch ll_dispatch(const Routing& routing, int hidden, int max_tokens, const std::vector<std::vector<uint16_t>>* x,
                       bool use_fp8 = false, ScaleFormat format = ScaleFormat::kFloat);
std::vector<std::vector<uint16_t>> ll_combine(const Routing& routing, const LlDispatch& dispatch,
                                              const std::vector<std::vector<uint16_t>>& y);
}  // namespace brute

}  // namespace nccl_moe::ref
