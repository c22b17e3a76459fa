// Traffic matrices of a routing (see traffic.h).
#include "reference/testing/traffic.h"

#include "reference/detail.h"

namespace nccl_moe::ref {

using detail::sz;

std::vector<int64_t> traffic_matrix(const Routing& routing) {
  routing.validate();
  const int R = routing.num_ranks;
  std::vector<int64_t> m(sz(R) * R, 0);
  for (int s = 0; s < R; ++s) {
    const RankRouting& rr = routing.ranks[s];
    const DispatchLayout l =
        get_dispatch_layout(rr.topk_idx.data(), rr.num_tokens, routing.topk, routing.num_experts, R);
    for (int d = 0; d < R; ++d) m[sz(s) * R + d] = l.num_tokens_per_rank[d];
  }
  return m;
}

std::vector<int64_t> ll_traffic_matrix(const Routing& routing) {
  routing.validate();
  const int R = routing.num_ranks;
  std::vector<int64_t> m(sz(R) * R, 0);
  for (int s = 0; s < R; ++s)
    for (int64_t e : routing.ranks[s].topk_idx)
      if (e >= 0) ++m[sz(s) * R + routing.expert_rank(e)];
  return m;
}

}  // namespace nccl_moe::ref
