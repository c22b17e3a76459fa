// Deterministic test data (see generators.h; docs/reference.md, "Generators", gives the streams).
//
// Contraction stays disabled as in reference.cc, where this code used to live: the weights, the skew CDF and the
// bf16 patterns are pinned bit for bit by golden hashes (ReferenceGen.DeterminismHashes), so no a * b + c here may
// fuse differently under another compiler or flag set.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "reference/testing/generators.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "reference/detail.h"

namespace nccl_moe::ref {

using detail::require;
using detail::sz;

uint64_t Rng::next() {
  state_ += 0x9e3779b97f4a7c15ull;
  uint64_t z = state_;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint32_t Rng::below(uint32_t n) { return static_cast<uint32_t>(((next() >> 32) * static_cast<uint64_t>(n)) >> 32); }

double Rng::uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }

uint64_t mix_seed(uint64_t a, uint64_t b) {
  Rng r(a ^ (b * 0xd6e8feb86659fd93ull + 0x632be59bd9b4e019ull));
  return r.next();
}

RankRouting make_rank_routing(const RoutingSpec& spec, int rank) {
  require(spec.num_ranks >= 1 && spec.num_experts >= spec.num_ranks && spec.num_experts % spec.num_ranks == 0,
          "make_routing: num_experts must be a positive multiple of num_ranks");
  require(spec.topk >= 1 && spec.topk <= spec.num_experts, "make_routing: topk must be in [1, num_experts]");
  require(spec.skew >= 1.0, "make_routing: skew must be >= 1");
  require(spec.tokens_per_rank.empty() || spec.tokens_per_rank.size() == sz(spec.num_ranks),
          "make_routing: tokens_per_rank must be empty or have num_ranks entries");
  require(rank >= 0 && rank < spec.num_ranks, "make_routing: rank out of range");
  const int E = spec.num_experts, K = spec.topk, El = E / spec.num_ranks;
  const bool grouped = spec.group_nodes > 0;
  int num_nodes = 1, node_experts = E;
  if (grouped) {
    require(spec.ranks_per_node >= 1 && spec.num_ranks % spec.ranks_per_node == 0,
            "make_routing: ranks_per_node must be >= 1 and divide num_ranks with group_nodes");
    num_nodes = spec.num_ranks / spec.ranks_per_node;
    node_experts = spec.ranks_per_node * El;
    require(spec.group_nodes <= num_nodes,
            "make_routing: group_nodes must be in [1, num_nodes = " + std::to_string(num_nodes) + "], got " +
                std::to_string(spec.group_nodes));
    require(static_cast<int64_t>(spec.group_nodes) * node_experts >= K,
            "make_routing: group_nodes * experts per node must be >= topk");
    require(spec.skew == 1.0, "make_routing: group_nodes cannot be combined with skew");
  }

  RankRouting rr;
  rr.num_tokens = spec.tokens_per_rank.empty() ? spec.num_tokens : spec.tokens_per_rank[rank];
  if (rank >= spec.num_ranks - spec.num_zero_token_ranks) rr.num_tokens = 0;
  require(rr.num_tokens >= 0, "make_routing: token counts must be >= 0");
  rr.topk_idx.assign(sz(rr.num_tokens) * K, -1);
  if (spec.with_weights) rr.topk_weights.assign(sz(rr.num_tokens) * K, 0.0f);

  // Cumulative expert weights (skew^-rank_of_expert); uniform when skew == 1.
  const bool uniform = spec.skew == 1.0;
  std::vector<double> cdf;
  if (!uniform) {
    cdf.resize(sz(E));
    double run = 0.0;
    for (int e = 0; e < E; ++e) {
      run += std::pow(spec.skew, -static_cast<double>(e / El));
      cdf[e] = run;
    }
  }
  Rng rng(mix_seed(spec.seed, static_cast<uint64_t>(rank)));
  std::vector<int64_t> chosen;
  std::vector<double> score(grouped ? sz(E) : 0), node_score(sz(num_nodes));
  std::vector<int> order;
  for (int t = 0; t < rr.num_tokens; ++t) {
    const bool empty = rng.uniform() < spec.empty_token_fraction;
    chosen.clear();
    if (grouped) {
      // Node-limited top-k: the best group_nodes nodes by their best expert, then the best K experts among
      // those nodes' experts. Ties (equal doubles, practically never) go to the lower id.
      for (int e = 0; e < E; ++e) score[e] = 1.0 + rng.uniform();
      for (int n = 0; n < num_nodes; ++n) {
        double m = 0.0;
        for (int e = n * node_experts; e < (n + 1) * node_experts; ++e) m = std::max(m, score[e]);
        node_score[n] = m;
      }
      order.resize(sz(num_nodes));
      for (int n = 0; n < num_nodes; ++n) order[n] = n;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return node_score[a] > node_score[b]; });
      std::vector<int> experts;
      for (int i = 0; i < spec.group_nodes; ++i)
        for (int e = order[i] * node_experts; e < (order[i] + 1) * node_experts; ++e) experts.push_back(e);
      std::sort(experts.begin(), experts.end());
      std::stable_sort(experts.begin(), experts.end(), [&](int a, int b) { return score[a] > score[b]; });
      for (int k = 0; k < K; ++k) chosen.push_back(experts[k]);
    }
    for (int k = 0; k < K && !grouped; ++k) {
      int64_t e = -1;
      for (int attempt = 0; attempt < 64 && e < 0; ++attempt) {
        int64_t c;
        if (uniform) {
          c = rng.below(static_cast<uint32_t>(E));
        } else {
          const double u = rng.uniform() * cdf.back();
          c = std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin();
          if (c >= E) c = E - 1;
        }
        if (std::find(chosen.begin(), chosen.end(), c) == chosen.end()) e = c;
      }
      if (e < 0) {  // heavy skew exhausted the likely experts: take the next unused one from a random start
        int64_t c = rng.below(static_cast<uint32_t>(E));
        while (std::find(chosen.begin(), chosen.end(), c) != chosen.end()) c = (c + 1) % E;
        e = c;
      }
      chosen.push_back(e);
    }
    for (int k = 0; k < K; ++k) {
      const bool masked = rng.uniform() < spec.masked_fraction;
      rr.topk_idx[sz(t) * K + k] = (empty || masked) ? -1 : chosen[k];
      // Masked slots get a weight too: correct consumers ignore it.
      if (spec.with_weights) rr.topk_weights[sz(t) * K + k] = static_cast<float>(1 + rng.below(64)) / 64.0f;
    }
  }
  return rr;
}

Routing make_routing(const RoutingSpec& spec) {
  Routing r;
  r.num_ranks = spec.num_ranks;
  r.num_experts = spec.num_experts;
  r.topk = spec.topk;
  for (int s = 0; s < spec.num_ranks; ++s) r.ranks.push_back(make_rank_routing(spec, s));
  r.validate();
  return r;
}

uint16_t pattern_bf16(uint64_t seed, int rank, int token, int channel, ValueKind kind) {
  const uint64_t h = mix_seed(mix_seed(mix_seed(seed, static_cast<uint64_t>(rank)), static_cast<uint64_t>(token)),
                              static_cast<uint64_t>(channel));
  const bool neg = (h >> 63) != 0;
  if (kind == ValueKind::kExact) {
    const float v = static_cast<float>(1 + (h & 0xffff) % 15) / 16.0f;
    return float_to_bf16(neg ? -v : v);
  }
  const int m = static_cast<int>(h & 0x7f);
  const int e = static_cast<int>((h >> 8) % 20) - 10;
  const float v = std::ldexp(1.0f + static_cast<float>(m) / 128.0f, e);
  return float_to_bf16(neg ? -v : v);
}

std::vector<uint16_t> make_bf16_rows(uint64_t seed, int rank, int num_tokens, int hidden, ValueKind kind) {
  std::vector<uint16_t> v(sz(num_tokens) * hidden);
  for (int t = 0; t < num_tokens; ++t)
    for (int c = 0; c < hidden; ++c) v[sz(t) * hidden + c] = pattern_bf16(seed, rank, t, c, kind);
  return v;
}

std::vector<std::vector<uint16_t>> make_bf16_rows_all(const Routing& routing, uint64_t seed, int hidden,
                                                      ValueKind kind) {
  std::vector<std::vector<uint16_t>> out;
  for (int s = 0; s < routing.num_ranks; ++s)
    out.push_back(make_bf16_rows(seed, s, routing.ranks[s].num_tokens, hidden, kind));
  return out;
}

}  // namespace nccl_moe::ref
