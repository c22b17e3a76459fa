// The scale-out pieces of the CPU reference: node maps and the two-level HT combine (ref::ht_combine_nodes)
// against the brute-force model and against the single-node contract, and the order pins of docs/reference.md.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "reference/reference.h"
#include "reference/testing/brute.h"
#include "reference/testing/compare.h"
#include "reference/testing/generators.h"

namespace nccl_moe::ref {
namespace {

struct NodesCase {
  RoutingSpec spec;
  int hidden = 8;
  std::string name() const {
    return "R=" + std::to_string(spec.num_ranks) + " E=" + std::to_string(spec.num_experts) +
           " K=" + std::to_string(spec.topk) + " T=" + std::to_string(spec.num_tokens) +
           " H=" + std::to_string(hidden) + " seed=" + std::to_string(spec.seed);
  }
};

// Seeded problems over ranks, experts, top-k, hidden sizes, masking, empty tokens, zero-token ranks and skew.
std::vector<NodesCase> nodes_sweep() {
  std::vector<NodesCase> cases;
  Rng rng(77);
  const int ranks[] = {1, 2, 3, 4, 6, 8};
  const int hiddens[] = {8, 136, 256};
  for (int R : ranks) {
    for (int i = 0; i < 10; ++i) {
      NodesCase c;
      c.spec.num_ranks = R;
      const int local_choices[] = {1, 2, 3, 8, 32};
      c.spec.num_experts = R * local_choices[rng.below(5)];
      c.spec.topk = std::min<int>(1 + static_cast<int>(rng.below(16)), c.spec.num_experts);
      c.hidden = hiddens[rng.below(3)];
      c.spec.num_tokens = static_cast<int>(rng.below(40));
      c.spec.skew = (i % 3 == 0) ? 1.0 : 1.0 + 4.0 * rng.uniform();
      c.spec.masked_fraction = (i % 2) ? 0.3 * rng.uniform() : 0.0;
      c.spec.empty_token_fraction = (i % 4 == 1) ? 0.2 : 0.0;
      c.spec.num_zero_token_ranks = (R > 1 && i % 5 == 2) ? 1 : 0;
      c.spec.seed = rng.next();
      cases.push_back(c);
    }
  }
  return cases;
}

// Node maps of R ranks: one node, consecutive groups of every divisor of R, and an interleaved map (r % 2).
std::vector<NodeMap> node_maps(int R) {
  std::vector<NodeMap> maps;
  for (int rpn = 1; rpn <= R; ++rpn)
    if (R % rpn == 0) maps.push_back(NodeMap::consecutive(R, rpn));
  if (R >= 2) {
    NodeMap m;
    for (int r = 0; r < R; ++r) m.node_of_rank.push_back(r % 2);
    maps.push_back(m);
  }
  return maps;
}

// Combine inputs whose sums round: kWide rows (values over 2^-10 .. 2^10, so FP32 sums of several differ from
// their bf16 rounding) and FP32 weights of mixed magnitudes and signs (so the order of their sum matters).
struct CombineInputs {
  std::vector<std::vector<uint16_t>> x;
  std::vector<std::vector<float>> w;
  std::vector<std::vector<uint16_t>> bias0, bias1;
};

CombineInputs make_inputs(const Routing& r, const HtDispatch& d, int H, uint64_t seed) {
  CombineInputs in;
  Rng rng(seed);
  for (int rank = 0; rank < r.num_ranks; ++rank) {
    in.x.push_back(make_bf16_rows(seed, rank, d.recv[rank].num_recv, H, ValueKind::kWide));
    std::vector<float> w(static_cast<size_t>(d.recv[rank].num_recv) * r.topk);
    for (float& v : w) {
      const float m = static_cast<float>(1 + rng.below(1 << 20)) / static_cast<float>(1 << 20);
      v = std::ldexp(rng.below(2) ? -m : m, static_cast<int>(rng.below(40)) - 20);
    }
    in.w.push_back(w);
  }
  in.bias0 = make_bf16_rows_all(r, seed + 1, H, ValueKind::kWide);
  in.bias1 = make_bf16_rows_all(r, seed + 2, H, ValueKind::kWide);
  return in;
}

TEST(ReferenceNodes, NodeMapBuildersAndValidation) {
  const NodeMap c = NodeMap::consecutive(8, 4);
  EXPECT_EQ(c.node_of_rank, (std::vector<int>{0, 0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(c.num_nodes(), 2);
  EXPECT_EQ(NodeMap::single(3).node_of_rank, (std::vector<int>{0, 0, 0}));
  EXPECT_EQ(NodeMap::single(3).num_nodes(), 1);
  EXPECT_EQ(NodeMap::consecutive(4, 1).num_nodes(), 4);
  EXPECT_THROW(NodeMap::consecutive(6, 4), std::invalid_argument);
  EXPECT_THROW(NodeMap::consecutive(4, 0), std::invalid_argument);
  EXPECT_NO_THROW(c.validate(8));
  EXPECT_THROW(c.validate(4), std::invalid_argument);  // wrong size
  NodeMap gap;
  gap.node_of_rank = {0, 2, 2};  // node 1 empty
  EXPECT_THROW(gap.validate(3), std::invalid_argument);
  NodeMap neg;
  neg.node_of_rank = {0, -1};
  EXPECT_THROW(neg.validate(2), std::invalid_argument);

  // ht_combine_nodes checks the map against the dispatch.
  RoutingSpec spec;
  spec.num_ranks = 4;
  spec.num_experts = 8;
  spec.topk = 2;
  spec.num_tokens = 3;
  const Routing r = make_routing(spec);
  const HtDispatch d = ht_dispatch(r, 1);
  std::vector<std::vector<uint16_t>> x;
  for (int rank = 0; rank < 4; ++rank) x.emplace_back(static_cast<size_t>(d.recv[rank].num_recv) * 8, 0);
  EXPECT_NO_THROW(ht_combine_nodes(d, NodeMap::consecutive(4, 2), x, 8));
  EXPECT_THROW(ht_combine_nodes(d, NodeMap::consecutive(2, 1), x, 8), std::invalid_argument);
}

// One node keeps today's flat contract bit for bit: rows, weights and 0/1/2 biases, on random problems whose sums
// round (so an extra rounding of the partial would show).
TEST(ReferenceNodes, OneNodeIsHtCombineBitwise) {
  int64_t rounding_visible = 0;  // multi-node results that differ from the flat sum: the test data can tell
  for (const NodesCase& c : nodes_sweep()) {
    SCOPED_TRACE(c.name());
    const Routing r = make_routing(c.spec);
    const int R = r.num_ranks, H = c.hidden;
    const HtDispatch d = ht_dispatch(r, 1);
    const CombineInputs in = make_inputs(r, d, H, c.spec.seed ^ 0x3c);
    for (int nb = 0; nb < 3; ++nb) {
      const auto* b0 = nb >= 1 ? &in.bias0 : nullptr;
      const auto* b1 = nb >= 2 ? &in.bias1 : nullptr;
      const HtCombineResult flat = ht_combine(d, in.x, H, &in.w, b0, b1);
      const HtCombineResult one = ht_combine_nodes(d, NodeMap::single(R), in.x, H, &in.w, b0, b1);
      ASSERT_EQ(hash(one), hash(flat)) << "biases " << nb;
      ASSERT_EQ(one.x, flat.x);
      ASSERT_EQ(one.topk_weights.size(), flat.topk_weights.size());
      for (size_t rank = 0; rank < flat.topk_weights.size(); ++rank)
        ASSERT_EQ(fnv1a64(one.topk_weights[rank]), fnv1a64(flat.topk_weights[rank])) << "weights of rank " << rank;
      if (R >= 3) {  // two nodes, node 0 with >= 2 ranks (one rank per node would round nothing: P = bf16(x) = x)
        NodeMap interleaved;
        for (int rank = 0; rank < R; ++rank) interleaved.node_of_rank.push_back(rank % 2);
        const HtCombineResult two = ht_combine_nodes(d, interleaved, in.x, H, &in.w, b0, b1);
        for (int s = 0; s < R; ++s)
          for (size_t i = 0; i < two.x[s].size(); ++i) rounding_visible += two.x[s][i] != flat.x[s][i];
      }
    }
  }
  EXPECT_GT(rounding_visible, 0) << "the sweep never exercises the partial rounding";
}

// The reference against the brute-force model's independent two-level order, every node map of the sweep.
TEST(ReferenceNodes, TwoLevelMatchesBruteForce) {
  for (const NodesCase& c : nodes_sweep()) {
    SCOPED_TRACE(c.name());
    const Routing r = make_routing(c.spec);
    const int H = c.hidden;
    const HtDispatch d = ht_dispatch(r, 1);
    const CombineInputs in = make_inputs(r, d, H, c.spec.seed ^ 0x5a);
    for (const NodeMap& nodes : node_maps(r.num_ranks)) {
      SCOPED_TRACE("nodes=" + std::to_string(nodes.num_nodes()) +
                   " map[1]=" + std::to_string(nodes.node_of_rank.size() > 1 ? nodes.node_of_rank[1] : 0));
      for (int nb = 0; nb < 3; ++nb) {
        const auto* b0 = nb >= 1 ? &in.bias0 : nullptr;
        const auto* b1 = nb >= 2 ? &in.bias1 : nullptr;
        const HtCombineResult a = ht_combine_nodes(d, nodes, in.x, H, &in.w, b0, b1);
        const HtCombineResult b = brute::ht_combine_nodes(d, nodes, in.x, H, &in.w, b0, b1);
        ASSERT_EQ(hash(a), hash(b)) << "biases " << nb;
        ASSERT_EQ(a.x, b.x);
        // Without weights: no weights come back.
        const HtCombineResult nw = ht_combine_nodes(d, nodes, in.x, H, nullptr, b0, b1);
        ASSERT_EQ(nw.x, a.x);
        for (const auto& v : nw.topk_weights) ASSERT_TRUE(v.empty());
      }
    }
  }
}

// The order pins of docs/reference.md, "High-throughput combine on several nodes".
TEST(ReferenceNodes, TwoLevelOrderContract) {
  // 4 ranks, one token on rank 0 naming experts 0..2 (ranks 0, 1, 2), one token naming expert 0 only.
  Routing r;
  r.num_ranks = 4;
  r.num_experts = 4;
  r.topk = 3;
  r.ranks.resize(4);
  r.ranks[0] = {2, {0, 1, 2, 0, -1, -1}, {}};
  const HtDispatch d = ht_dispatch(r, 1);
  const auto f = [](float v) { return float_to_bf16(v); };
  const uint16_t one = f(1.0f), m_one = f(-1.0f), tiny = f(std::ldexp(1.0f, -30)), eps8 = f(std::ldexp(1.0f, -8));
  const NodeMap two = NodeMap::consecutive(4, 2);  // node 0 = ranks 0,1; node 1 = ranks 2,3
  const auto both = [&](const NodeMap& nodes, const std::vector<std::vector<uint16_t>>& x,
                        const std::vector<std::vector<uint16_t>>* b0 = nullptr,
                        const std::vector<std::vector<uint16_t>>* b1 = nullptr) {
    const HtCombineResult a = ht_combine_nodes(d, nodes, x, 1, nullptr, b0, b1);
    EXPECT_EQ(a.x, brute::ht_combine_nodes(d, nodes, x, 1, nullptr, b0, b1).x);
    return a.x[0];
  };
  // Each node's partial is rounded to bf16: node 0 = bf16(1 + 2^-8) = 1 (tie to even), node 1 = 2^-8,
  // out = bf16(1 + 2^-8) = 1. The flat sum (one node) gives 1 + 2^-8 + 2^-8 = 1 + 2^-7.
  std::vector<std::vector<uint16_t>> x = {{one, 0}, {eps8}, {eps8}, {}};
  EXPECT_EQ(both(two, x)[0], one);
  EXPECT_EQ(both(NodeMap::single(4), x)[0], f(1.0f + std::ldexp(1.0f, -7)));
  EXPECT_EQ(ht_combine(d, x, 1).x[0][0], f(1.0f + std::ldexp(1.0f, -7)));
  // Inside a node, ranks ascending: a node of ranks 0,1,2 with rows 1, -1, 2^-30 gives 2^-30 (other orders 0).
  NodeMap three;
  three.node_of_rank = {0, 0, 0, 1};
  x = {{one, 0}, {m_one}, {tiny}, {}};
  EXPECT_EQ(both(three, x)[0], tiny);
  // Nodes ascending: one rank per node, partials 1, -1, 2^-30 (exact in bf16) give 2^-30.
  EXPECT_EQ(both(NodeMap::consecutive(4, 1), x)[0], tiny);
  // Interleaved map: node 0 = ranks 0,2 (1 + 2^-30 rounds to 1), node 1 = rank 1 (-1): out 0, where the
  // consecutive map of 1 rank per node keeps 2^-30.
  NodeMap interleaved;
  interleaved.node_of_rank = {0, 1, 0, 1};
  EXPECT_EQ(both(interleaved, x)[0], 0x0000);
  // Biases after the node sum, bias0 before bias1, and they are not part of any partial:
  // nodes {0,1}: P0 = bf16(1 + 2^-8) = 1, P1 = 2^-8; ((0 + 1) + 2^-8) + 2^-8 (bias0) + -1 (bias1) = 2^-7.
  x = {{one, 0}, {eps8}, {eps8}, {}};
  const std::vector<std::vector<uint16_t>> b0 = {{eps8, 0}, {}, {}, {}}, b1 = {{m_one, 0}, {}, {}, {}};
  EXPECT_EQ(both(two, x, &b0, &b1)[0], f(std::ldexp(1.0f, -7)));
  // A token that only one rank received: its row comes back (P = bf16(0 + x) = x); -0 becomes +0.
  x = {{one, 0x8000}, {0}, {0}, {}};
  EXPECT_EQ(both(two, x)[1], 0x0000);
  // Weights: per node in FP32 (never rounded to bf16), then over the nodes ascending.
  NodeMap last_two;
  last_two.node_of_rank = {0, 1, 1, 1};  // node 0 = rank 0, node 1 = ranks 1, 2, 3
  std::vector<std::vector<float>> w(4);
  for (int rank = 0; rank < 4; ++rank) w[rank].assign(static_cast<size_t>(d.recv[rank].num_recv) * 3, 0.0f);
  w[0][0] = 1.0f;                   // token 0 at rank 0, slot 0
  w[1][1] = std::ldexp(1.0f, -24);  // token 0 at rank 1, slot 1
  w[2][2] = std::ldexp(1.0f, -24);  // token 0 at rank 2, slot 2
  x = {{0, 0}, {0}, {0}, {}};
  // Slots are separate sums: each slot has one non-zero term, so every order gives the weights back exactly.
  const HtCombineResult wa = ht_combine_nodes(d, last_two, x, 1, &w);
  EXPECT_EQ(wa.topk_weights[0], (std::vector<float>{1.0f, std::ldexp(1.0f, -24), std::ldexp(1.0f, -24), 0, 0, 0}));
  EXPECT_EQ(wa.topk_weights, brute::ht_combine_nodes(d, last_two, x, 1, &w).topk_weights);
  // One slot summed over several ranks (the weights are an arbitrary FP32 input of combine): slot 0 gets
  // 1, 2^-24, 2^-24 from ranks 0, 1, 2. Nodes {0}, {1,2,3}: 0 + 1 + (0 + 2^-24 + 2^-24) = 1 + 2^-23; the flat
  // order ((0 + 1) + 2^-24) + 2^-24 rounds to 1 twice (ties to even).
  w[1][0] = std::ldexp(1.0f, -24);
  w[2][0] = std::ldexp(1.0f, -24);
  EXPECT_EQ(ht_combine_nodes(d, last_two, x, 1, &w).topk_weights[0][0], 1.0f + std::ldexp(1.0f, -23));
  EXPECT_EQ(brute::ht_combine_nodes(d, last_two, x, 1, &w).topk_weights[0][0], 1.0f + std::ldexp(1.0f, -23));
  EXPECT_EQ(ht_combine_nodes(d, NodeMap::single(4), x, 1, &w).topk_weights[0][0], 1.0f);
  EXPECT_EQ(ht_combine(d, x, 1, &w).topk_weights[0][0], 1.0f);
}

// ------------------------------------------------------------------------------------------------
// Group-limited routing (RoutingSpec::group_nodes)
// ------------------------------------------------------------------------------------------------

// Distinct nodes (rank / ranks_per_node) named by the valid slots of token t of rank s.
int nodes_of_token(const Routing& r, int s, int t, int ranks_per_node) {
  std::vector<bool> seen(static_cast<size_t>(r.num_ranks / ranks_per_node), false);
  int n = 0;
  for (int k = 0; k < r.topk; ++k) {
    const int64_t e = r.ranks[s].topk_idx[static_cast<size_t>(t) * r.topk + k];
    if (e < 0) continue;
    const int node = r.expert_rank(e) / ranks_per_node;
    if (!seen[node]) ++n;
    seen[node] = true;
  }
  return n;
}

RoutingSpec group_spec(int R, int rpn, int E, int K, int g, int T, uint64_t seed) {
  RoutingSpec spec;
  spec.num_ranks = R;
  spec.ranks_per_node = rpn;
  spec.num_experts = E;
  spec.topk = K;
  spec.group_nodes = g;
  spec.num_tokens = T;
  spec.seed = seed;
  return spec;
}

TEST(ReferenceGroupRouting, ExpertsLieWithinGroupNodes) {
  struct Shape {
    int R, rpn, E, K, g;
  };
  const Shape shapes[] = {{16, 8, 256, 8, 1}, {16, 8, 256, 8, 2}, {32, 8, 256, 8, 4}, {64, 8, 256, 8, 4},
                          {8, 2, 64, 6, 2},   {8, 1, 16, 4, 3},   {4, 2, 4, 2, 1},    {6, 2, 12, 5, 2}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE("R=" + std::to_string(sh.R) + " rpn=" + std::to_string(sh.rpn) + " E=" + std::to_string(sh.E) +
                 " K=" + std::to_string(sh.K) + " g=" + std::to_string(sh.g));
    RoutingSpec spec = group_spec(sh.R, sh.rpn, sh.E, sh.K, sh.g, 300, 11);
    spec.masked_fraction = 0.1;
    spec.empty_token_fraction = 0.05;
    spec.num_zero_token_ranks = 1;
    const Routing r = make_routing(spec);
    int64_t at_limit = 0, tokens = 0;
    for (int s = 0; s < sh.R; ++s) {
      for (int t = 0; t < r.ranks[s].num_tokens; ++t) {
        const int n = nodes_of_token(r, s, t, sh.rpn);
        ASSERT_LE(n, sh.g) << "rank " << s << " token " << t;
        at_limit += n == sh.g;
        ++tokens;
        for (int k = 0; k < sh.K; ++k) {
          const int64_t e = r.ranks[s].topk_idx[static_cast<size_t>(t) * sh.K + k];
          for (int k2 = 0; k2 < k && e >= 0; ++k2)
            ASSERT_NE(e, r.ranks[s].topk_idx[static_cast<size_t>(t) * sh.K + k2]);
          const float w = r.ranks[s].topk_weights[static_cast<size_t>(t) * sh.K + k];
          ASSERT_TRUE(w > 0 && w <= 1 && w * 64 == std::floor(w * 64));
        }
      }
    }
    // The limit binds: with K >= g, a good share of the tokens uses all g nodes.
    if (sh.K >= sh.g) EXPECT_GT(at_limit, tokens / 4);
    // The same shape drawn without the limit does spread wider (so the assertion above can fail).
    RoutingSpec free = spec;
    free.group_nodes = 0;
    const Routing u = make_routing(free);
    int wider = 0;
    for (int s = 0; s < sh.R; ++s)
      for (int t = 0; t < u.ranks[s].num_tokens; ++t) wider += nodes_of_token(u, s, t, sh.rpn) > sh.g;
    if (sh.g < sh.R / sh.rpn && sh.K > sh.g) EXPECT_GT(wider, 0);
  }
}

TEST(ReferenceGroupRouting, DeterministicForASeed) {
  RoutingSpec spec = group_spec(16, 4, 64, 8, 2, 100, 5);
  spec.masked_fraction = 0.2;
  const Routing a = make_routing(spec), b = make_routing(spec);
  for (int s = 0; s < 16; ++s) {
    EXPECT_EQ(a.ranks[s].topk_idx, b.ranks[s].topk_idx);
    EXPECT_EQ(a.ranks[s].topk_weights, b.ranks[s].topk_weights);
    EXPECT_EQ(make_rank_routing(spec, s).topk_idx, a.ranks[s].topk_idx);  // any rank regenerates any rank
  }
  spec.seed = 6;
  EXPECT_NE(make_routing(spec).ranks[0].topk_idx, a.ranks[0].topk_idx);
  // Golden value: the stream is part of the generator's contract (docs/reference.md, "Generators").
  uint64_t h = kFnvOffset;
  for (const RankRouting& rr : a.ranks) h = fnv1a64(rr.topk_idx, fnv1a64(rr.topk_weights, h));
  EXPECT_EQ(h, 0x35b70bfa0a5f6430ull) << std::hex << h;
}

// group_nodes == nodes constrains nothing: the top-K of i.i.d. scores is a uniform K-subset, so the draw has the
// unconstrained uniform draw's distribution. Asserted: every expert equally likely (chi-square), and the mean
// number of distinct nodes and ranks per token equal to the uniform draw's (and to the exact expectation).
TEST(ReferenceGroupRouting, AllNodesIsUnconstrained) {
  const int R = 16, rpn = 4, E = 64, K = 8, T = 4000, nodes = R / rpn;
  const Routing g = make_routing(group_spec(R, rpn, E, K, nodes, T, 21));
  RoutingSpec uspec = group_spec(R, rpn, E, K, 0, T, 22);
  const Routing u = make_routing(uspec);
  const auto stats = [&](const Routing& r, std::vector<int64_t>* per_expert, double* mean_nodes, double* mean_ranks) {
    per_expert->assign(E, 0);
    int64_t nsum = 0, rsum = 0, tokens = 0;
    for (int s = 0; s < R; ++s) {
      for (int t = 0; t < r.ranks[s].num_tokens; ++t) {
        std::vector<bool> rank_seen(R, false);
        for (int k = 0; k < K; ++k) {
          const int64_t e = r.ranks[s].topk_idx[static_cast<size_t>(t) * K + k];
          ++(*per_expert)[e];
          rsum += !rank_seen[r.expert_rank(e)];
          rank_seen[r.expert_rank(e)] = true;
        }
        nsum += nodes_of_token(r, s, t, rpn);
        ++tokens;
      }
    }
    *mean_nodes = static_cast<double>(nsum) / tokens;
    *mean_ranks = static_cast<double>(rsum) / tokens;
  };
  std::vector<int64_t> ge, ue;
  double gn, gr, un, ur;
  stats(g, &ge, &gn, &gr);
  stats(u, &ue, &un, &ur);
  // Chi-square of per-expert counts against uniform, 63 degrees of freedom: the 99.99% quantile is about 118.
  const double expect = static_cast<double>(R) * T * K / E;
  double chi = 0;
  for (int e = 0; e < E; ++e) chi += (ge[e] - expect) * (ge[e] - expect) / expect;
  EXPECT_LT(chi, 118.0);
  // Exact expectation of distinct groups hit by a uniform K-subset of E items in groups of m:
  // groups * (1 - C(E - m, K) / C(E, K)).
  const auto expected_groups = [&](int groups) {
    const int m = E / groups;
    double p_miss = 1.0;
    for (int i = 0; i < K; ++i) p_miss *= static_cast<double>(E - m - i) / (E - i);
    return groups * (1.0 - p_miss);
  };
  EXPECT_NEAR(gn, expected_groups(nodes), 0.02);
  EXPECT_NEAR(gr, expected_groups(R), 0.05);
  EXPECT_NEAR(gn, un, 0.03);
  EXPECT_NEAR(gr, ur, 0.07);
}

TEST(ReferenceGroupRouting, InvalidArgumentsThrow) {
  RoutingSpec spec = group_spec(8, 4, 32, 4, 2, 10, 1);
  EXPECT_NO_THROW(make_routing(spec));
  spec.group_nodes = 3;  // only 2 nodes
  EXPECT_THROW(make_routing(spec), std::invalid_argument);
  spec.group_nodes = 1;
  spec.ranks_per_node = 3;  // does not divide 8
  EXPECT_THROW(make_routing(spec), std::invalid_argument);
  spec.ranks_per_node = 0;
  EXPECT_THROW(make_routing(spec), std::invalid_argument);
  spec = group_spec(8, 1, 8, 2, 1, 10, 1);  // one expert per node, K = 2 cannot fit in one node
  EXPECT_THROW(make_routing(spec), std::invalid_argument);
  spec.group_nodes = 2;
  EXPECT_NO_THROW(make_routing(spec));
  spec.skew = 2;
  EXPECT_THROW(make_routing(spec), std::invalid_argument);
}

// ref::ht_node_plan on a problem small enough to write down: R = 4, E = 4 (one expert per rank), rank 0 sends
// t0 -> {1, 2}, t1 -> {3}, t2 -> {0}, t3 -> nothing, t4 -> {2, 3}; the other ranks have no tokens.
TEST(ReferenceHtNodePlan, HandExample) {
  Routing r;
  r.num_ranks = 4;
  r.num_experts = 4;
  r.topk = 2;
  r.ranks.resize(4);
  r.ranks[0].num_tokens = 5;
  r.ranks[0].topk_idx = {1, 2, 3, -1, 0, -1, -1, -1, 2, 3};
  const HtDispatch d = ht_dispatch(r, 1);
  {
    const HtNodePlan p = ht_node_plan(d, NodeMap::consecutive(4, 2));  // nodes {0, 1}, {2, 3}
    EXPECT_EQ(2, p.num_nodes);
    EXPECT_EQ(2, p.ranks_per_node);
    EXPECT_EQ(p.node_list[0][0], (std::vector<int>{0, 2}));
    EXPECT_EQ(p.node_list[0][1], (std::vector<int>{0, 1, 4}));
    // Node 0: t0 at rank 1 (its first token there), t2 at rank 0.
    EXPECT_EQ(p.hold_pos[0][0], (std::vector<int>{-1, 0, 0, -1}));
    // Node 1: t0 at rank 2 position 0; t1 at rank 3 position 0; t4 at ranks 2 and 3, position 1 each.
    EXPECT_EQ(p.hold_pos[0][1], (std::vector<int>{0, -1, -1, 0, 1, 1}));
    EXPECT_EQ(p.node_pos[0], (std::vector<int>{0, 0, -1, 1, 1, -1, -1, -1, -1, 2}));
    EXPECT_EQ(p.rank_count[0], (std::vector<int>{1, 1, 2, 2}));
    EXPECT_EQ(2, p.forwarder(0, 1));
    EXPECT_EQ(0, p.forwarder(0, 0));
    EXPECT_EQ(1, p.forwarder(3, 0));
    EXPECT_EQ(3, p.rdma_records(0));  // t0, t1, t4 to node 1; node 0 is rank 0's own
    EXPECT_EQ(0, p.rdma_records(1));
    EXPECT_EQ(3, p.combine_slot(1, 1));
  }
  {
    NodeMap m;
    m.node_of_rank = {0, 1, 0, 1};  // nodes {0, 2}, {1, 3}: the rail of rank 0 on node 1 is rank 1
    const HtNodePlan p = ht_node_plan(d, m);
    EXPECT_EQ(p.rank_of[0], (std::vector<int>{0, 2}));
    EXPECT_EQ(p.rank_of[1], (std::vector<int>{1, 3}));
    EXPECT_EQ(1, p.forwarder(0, 1));
    EXPECT_EQ(1, p.local_index[2]);
    EXPECT_EQ(p.node_list[0][0], (std::vector<int>{0, 2, 4}));  // holders 0 and 2
    EXPECT_EQ(p.node_list[0][1], (std::vector<int>{0, 1, 4}));  // holders 1 and 3
    EXPECT_EQ(p.hold_pos[0][0], (std::vector<int>{-1, 0, 0, -1, -1, 1}));
    EXPECT_EQ(p.hold_pos[0][1], (std::vector<int>{0, -1, -1, 0, -1, 1}));
  }
  NodeMap uneven;
  uneven.node_of_rank = {0, 0, 0, 1};
  EXPECT_THROW(ht_node_plan(d, uneven), std::invalid_argument);
}

// The plan is the dispatch done in two hops: replaying every record of every (source, node) pair to the holders its
// positions name fills every row of every receiving rank exactly once with the right (source rank, token), the
// lists are ascending, the per-rank counts are the notify counts, and the records crossing RDMA are the (token,
// other node) pairs counted straight from the routing.
TEST(ReferenceHtNodePlan, TwoHopsReproduceTheDispatch) {
  int checked = 0;
  for (const NodesCase& c : nodes_sweep()) {
    const Routing r = make_routing(c.spec);
    const HtDispatch d = ht_dispatch(r, 1);
    const int R = r.num_ranks;
    for (const NodeMap& map : node_maps(R)) {
      SCOPED_TRACE(c.name());
      std::vector<int> per_node(static_cast<size_t>(map.num_nodes()), 0);
      for (int v : map.node_of_rank) ++per_node[static_cast<size_t>(v)];
      if (std::count(per_node.begin(), per_node.end(), per_node[0]) != map.num_nodes()) {
        EXPECT_THROW(ht_node_plan(d, map), std::invalid_argument) << "nodes of unequal size have no rails";
        continue;
      }
      const HtNodePlan p = ht_node_plan(d, map);
      const int N = p.num_nodes, G = p.ranks_per_node;
      std::vector<std::vector<int>> filled(static_cast<size_t>(R));
      for (int dst = 0; dst < R; ++dst) filled[dst].assign(static_cast<size_t>(d.recv[dst].num_recv), 0);
      for (int s = 0; s < R; ++s) {
        int64_t rdma = 0;
        for (int t = 0; t < r.ranks[s].num_tokens; ++t) {
          std::vector<char> node_hit(static_cast<size_t>(N), 0);
          for (int k = 0; k < r.topk; ++k) {
            const int64_t e = r.ranks[s].topk_idx[static_cast<size_t>(t) * r.topk + k];
            if (e >= 0) node_hit[static_cast<size_t>(map.node_of_rank[r.expert_rank(e)])] = 1;
          }
          for (int m = 0; m < N; ++m) {
            EXPECT_EQ(node_hit[m] != 0, p.node_pos[s][static_cast<size_t>(t) * N + m] >= 0);
            if (node_hit[m] && m != map.node_of_rank[s]) ++rdma;
          }
        }
        EXPECT_EQ(rdma, p.rdma_records(s));
        for (int m = 0; m < N; ++m) {
          const std::vector<int>& list = p.node_list[s][m];
          ASSERT_EQ(list.size() * G, p.hold_pos[s][m].size());
          for (size_t q = 0; q < list.size(); ++q) {
            if (q > 0) EXPECT_LT(list[q - 1], list[q]) << "ascending";
            EXPECT_EQ(static_cast<int>(q), p.node_pos[s][static_cast<size_t>(list[q]) * N + m]);
            bool any = false;
            for (int j = 0; j < G; ++j) {
              const int pos = p.hold_pos[s][m][q * G + j];
              if (pos < 0) continue;
              any = true;
              const int dst = p.rank_of[m][j];
              const int row = d.recv[dst].rank_prefix[s] + pos;
              ASSERT_LT(row, d.recv[dst].num_recv);
              ++filled[dst][row];
              EXPECT_EQ(s, d.recv[dst].src_rank[row]);
              EXPECT_EQ(list[q], d.recv[dst].src_token[row]);
            }
            EXPECT_TRUE(any) << "a record with no holder on its node";
          }
        }
        for (int dst = 0; dst < R; ++dst)
          EXPECT_EQ(d.recv[dst].rank_prefix[s + 1] - d.recv[dst].rank_prefix[s], p.rank_count[s][dst]);
      }
      for (int dst = 0; dst < R; ++dst)
        for (int row = 0; row < d.recv[dst].num_recv; ++row) EXPECT_EQ(1, filled[dst][row]) << "rank " << dst;
      ++checked;
    }
  }
  EXPECT_GT(checked, 100);
}

}  // namespace
}  // namespace nccl_moe::ref
