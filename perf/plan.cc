// Baseline index plans (contract in plan.h).
#include "plan.h"

#include <stdexcept>

namespace nccl_moe::perf {

namespace {

size_t sz(int v) { return static_cast<size_t>(v); }

std::vector<int> prefix(const std::vector<int>& counts) {
  std::vector<int> p(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) p[i + 1] = p[i] + counts[i];
  return p;
}

}  // namespace

HtPlan makeHtPlan(const ref::HtDispatch& dispatch, int rank) {
  const int R = dispatch.num_ranks;
  if (rank < 0 || rank >= R) throw std::invalid_argument("makeHtPlan: rank out of range");
  HtPlan p;
  p.rank = rank;
  p.num_ranks = R;
  p.num_tokens = dispatch.num_tokens[sz(rank)];
  const int T = p.num_tokens;
  const std::vector<int>& pos = dispatch.send_pos[sz(rank)];  // [T * R]

  p.send_counts.assign(sz(R), 0);
  for (int t = 0; t < T; ++t)
    for (int d = 0; d < R; ++d) p.send_counts[sz(d)] += pos[sz(t) * sz(R) + sz(d)] >= 0;
  p.send_offsets = prefix(p.send_counts);
  p.send_tokens.assign(sz(p.send_offsets[sz(R)]), -1);
  p.combine_rows.assign(sz(T) * sz(R), -1);
  for (int t = 0; t < T; ++t)
    for (int d = 0; d < R; ++d) {
      const int q = pos[sz(t) * sz(R) + sz(d)];
      if (q < 0) continue;
      const int row = p.send_offsets[sz(d)] + q;
      p.send_tokens[sz(row)] = t;
      p.combine_rows[sz(t) * sz(R) + sz(d)] = row;
    }

  const std::vector<int>& rp = dispatch.recv[sz(rank)].rank_prefix;  // [R + 1]
  p.recv_offsets = rp;
  p.recv_counts.assign(sz(R), 0);
  for (int s = 0; s < R; ++s) p.recv_counts[sz(s)] = rp[sz(s) + 1] - rp[sz(s)];
  return p;
}

LlPlan makeLlPlan(const ref::Routing& routing, const ref::LlDispatch& dispatch, int rank) {
  const int R = routing.num_ranks, K = routing.topk, El = routing.num_local_experts();
  if (rank < 0 || rank >= R) throw std::invalid_argument("makeLlPlan: rank out of range");
  LlPlan p;
  p.rank = rank;
  p.num_ranks = R;
  p.topk = K;
  p.num_local_experts = El;
  p.slab_rows = dispatch.slab_rows();
  p.num_tokens = routing.ranks[sz(rank)].num_tokens;

  // Sender side: bucket this rank's (t, k) by destination expert, tokens ascending inside a bucket.
  {
    const ref::RankRouting& rr = routing.ranks[sz(rank)];
    std::vector<std::vector<int>> bucket(sz(routing.num_experts));  // (t * K + k) per expert
    for (int t = 0; t < rr.num_tokens; ++t)
      for (int k = 0; k < K; ++k) {
        const int64_t e = rr.topk_idx[sz(t) * sz(K) + sz(k)];
        if (e >= 0) bucket[static_cast<size_t>(e)].push_back(t * K + k);
      }
    p.send_counts.assign(sz(R), 0);
    for (int e = 0; e < routing.num_experts; ++e) p.send_counts[sz(e / El)] += static_cast<int>(bucket[sz(e)].size());
    p.send_offsets = prefix(p.send_counts);
    p.send_tokens.reserve(sz(p.send_offsets[sz(R)]));
    p.combine_rows.assign(sz(p.num_tokens) * sz(K), -1);
    // Experts are numbered rank-major, so walking e ascending visits d ascending, then j ascending.
    for (int e = 0; e < routing.num_experts; ++e)
      for (int tk : bucket[sz(e)]) {
        p.combine_rows[sz(tk)] = static_cast<int>(p.send_tokens.size());
        p.send_tokens.push_back(tk / K);
      }
  }

  // Receiver side: the group of each source s, in s's send order, mapped to slab positions.
  p.recv_counts.assign(sz(R), 0);
  for (int s = 0; s < R; ++s) {
    const ref::RankRouting& rr = routing.ranks[sz(s)];
    std::vector<std::vector<int>> bucket(sz(El));  // slab positions per local expert
    for (int t = 0; t < rr.num_tokens; ++t)
      for (int k = 0; k < K; ++k) {
        const int64_t e = rr.topk_idx[sz(t) * sz(K) + sz(k)];
        if (e < 0 || routing.expert_rank(e) != rank) continue;
        const int j = static_cast<int>(e % El);
        const int row = dispatch.send_row[sz(s)][sz(t) * sz(K) + sz(k)];
        bucket[sz(j)].push_back(j * p.slab_rows + row);
      }
    for (int j = 0; j < El; ++j) {
      p.recv_counts[sz(s)] += static_cast<int>(bucket[sz(j)].size());
      p.recv_slab_rows.insert(p.recv_slab_rows.end(), bucket[sz(j)].begin(), bucket[sz(j)].end());
    }
  }
  p.recv_offsets = prefix(p.recv_counts);
  return p;
}

}  // namespace nccl_moe::perf
