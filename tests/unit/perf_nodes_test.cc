// moe-perf on several nodes, CPU only: --ranks-per-node and --routing group:<g> (parsing, the rank-dependent
// checks, the routing a problem gets), and the RDMA / NVLink byte accounting of the internode paths.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "link_bytes.h"
#include "options.h"
#include "problem.h"
#include "reference/testing/generators.h"
#include "reference/testing/traffic.h"
#include "report.h"
#include "run_common.h"

namespace nccl_moe::perf {
namespace {

std::string parseError(const std::vector<std::string>& args) {
  Options o;
  std::string err;
  EXPECT_FALSE(parseOptions(args, &o, &err));
  return err;
}

Options parsed(const std::vector<std::string>& args) {
  Options o;
  std::string err;
  EXPECT_TRUE(parseOptions(args, &o, &err)) << err;
  return o;
}

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

TEST(PerfNodes, ParseGroupRoutingAndRanksPerNode) {
  Options o = parsed({"--routing", "group:4", "--ranks-per-node", "8"});
  EXPECT_EQ(o.routing.group_nodes, 4);
  EXPECT_EQ(o.routing.text, "group:4");
  EXPECT_EQ(o.ranks_per_node, 8);
  o = parsed({"--routing=group:2,masked:0.1"});
  EXPECT_EQ(o.routing.group_nodes, 2);
  EXPECT_DOUBLE_EQ(o.routing.masked_fraction, 0.1);
  EXPECT_EQ(o.routing.text, "group:2,masked:0.1");
  o = parsed({});
  EXPECT_EQ(o.routing.group_nodes, 0);
  EXPECT_EQ(o.ranks_per_node, 0);
  EXPECT_EQ(o.routing.text, "uniform");  // the single-node default is unchanged
  EXPECT_TRUE(has(parseError({"--routing", "group:0"}), "g >= 1"));
  EXPECT_TRUE(has(parseError({"--routing", "group:x"}), "group:<g>"));
  EXPECT_TRUE(has(parseError({"--routing", "group"}), "group:<g>"));
  EXPECT_TRUE(has(parseError({"--routing", "group:2,skewed:2"}), "cannot be combined"));
  EXPECT_TRUE(has(parseError({"--ranks-per-node", "0"}), "--ranks-per-node"));
  EXPECT_TRUE(has(usageText(), "--ranks-per-node"));
  EXPECT_TRUE(has(usageText(), "group:<g>"));
}

TEST(PerfNodes, CheckNodesNamesTheProblem) {
  ModeConfig c = resolveMode(Options{}, Mode::kHt);  // 256 experts, top-8
  RoutingChoice uniform, group;
  group.group_nodes = 4;
  EXPECT_EQ(checkNodes(uniform, 0, c, 16), "");
  EXPECT_EQ(checkNodes(uniform, 8, c, 16), "");
  EXPECT_TRUE(has(checkNodes(uniform, 6, c, 16), "--ranks-per-node 6 must divide the rank count 16"));
  EXPECT_TRUE(has(checkNodes(group, 0, c, 16), "needs a node count: give --ranks-per-node"));
  EXPECT_TRUE(has(checkNodes(group, 8, c, 16), "g must be in [1, nodes] = [1, 2]"));
  EXPECT_EQ(checkNodes(group, 8, c, 32), "");
  EXPECT_EQ(checkNodes(group, 4, c, 16), "");  // g = nodes
  c.experts = 16;
  c.topk = 8;
  group.group_nodes = 1;
  EXPECT_TRUE(has(checkNodes(group, 2, c, 16), "cannot hold --topk 8"));  // 8 nodes of 2 experts
  group.group_nodes = 4;
  EXPECT_EQ(checkNodes(group, 2, c, 16), "");
  EXPECT_EQ(numNodes(16, 0), 1);
  EXPECT_EQ(numNodes(16, 4), 4);
}

TEST(PerfNodes, ProblemGetsGroupLimitedRouting) {
  ProblemSpec spec;
  spec.mode = Mode::kHt;
  spec.num_ranks = 8;
  spec.ranks_per_node = 2;
  spec.tokens = 64;
  spec.hidden = 128;
  spec.topk = 6;
  spec.experts = 32;
  spec.routing.group_nodes = 2;
  spec.routing.text = "group:2";
  const Problem p = buildProblem(spec);
  EXPECT_EQ(p.numNodes(), 4);
  int at_two = 0;
  for (int s = 0; s < 8; ++s) {
    for (int t = 0; t < 64; ++t) {
      std::vector<bool> seen(4, false);
      int n = 0;
      for (int k = 0; k < 6; ++k) {
        const int node = p.routing.expert_rank(p.routing.ranks[s].topk_idx[t * 6 + k]) / 2;
        n += !seen[node];
        seen[node] = true;
      }
      ASSERT_LE(n, 2);
      at_two += n == 2;
    }
  }
  EXPECT_GT(at_two, 0);
  // The expected combine still comes from the reference (the single-node HT contract: what today's kernels run).
  EXPECT_EQ(p.ht_expected_combine.size(), 8u);
}

// ------------------------------------------------------------------------------------------------
// RDMA / NVLink bytes (link_bytes.h)
// ------------------------------------------------------------------------------------------------

using V = std::vector<int64_t>;

// 4 ranks on 2 nodes ({0,1}, {2,3}), one expert per rank, top-3.
ref::Routing handRouting() {
  ref::Routing r;
  r.num_ranks = 4;
  r.num_experts = 4;
  r.topk = 3;
  r.ranks.resize(4);
  r.ranks[0] = {1, {1, 2, 3}, {}};    // holders 1 (own node), 2 and 3 (node 1)
  r.ranks[1] = {1, {1, -1, -1}, {}};  // only itself: nothing moves
  r.ranks[2] = {0, {}, {}};
  r.ranks[3] = {2, {0, -1, -1, 3, 2, -1}, {}};  // token 0: holder 0 (node 0); token 1: 3 (itself) and 2
  return r;
}

TEST(PerfNodes, HtDispatchRailPathByHand) {
  const LinkRows rows = htDispatchLinkRows(handRouting(), 2);
  // Rank 0 token 0: NVLink 0 -> 1 on its own node; RDMA 0 -> 2 (its rail peer, local index 0), which holds
  // expert 2 and forwards over NVLink 2 -> 3. Rank 3 token 0: RDMA 3 -> 1 (local index 1 on node 0), NVLink 1 -> 0.
  // Rank 3 token 1: own node, NVLink 3 -> 2.
  EXPECT_EQ(rows.rdma_send, (V{1, 0, 0, 1}));
  EXPECT_EQ(rows.rdma_recv, (V{0, 1, 1, 0}));
  EXPECT_EQ(rows.nvl_send, (V{1, 1, 1, 1}));
  EXPECT_EQ(rows.nvl_recv, (V{1, 1, 1, 1}));
  const LinkRows back = reversedLinkRows(rows);
  EXPECT_EQ(back.rdma_send, rows.rdma_recv);
  EXPECT_EQ(back.rdma_recv, rows.rdma_send);
  EXPECT_EQ(back.nvl_send, rows.nvl_recv);
  EXPECT_EQ(back.nvl_recv, rows.nvl_send);
  EXPECT_THROW(htDispatchLinkRows(handRouting(), 3), std::invalid_argument);
}

TEST(PerfNodes, LlOneMessagePerTokenAndRankByHand) {
  const LinkRows rows = llDispatchLinkRows(handRouting(), 2);
  // Rank 0 token 0: NVLink to 1, RDMA to 2 and to 3 (no forwarding). Rank 3: token 0 RDMA to 0, token 1 NVLink to 2.
  EXPECT_EQ(rows.rdma_send, (V{2, 0, 0, 1}));
  EXPECT_EQ(rows.rdma_recv, (V{1, 0, 1, 1}));
  EXPECT_EQ(rows.nvl_send, (V{1, 0, 0, 1}));
  EXPECT_EQ(rows.nvl_recv, (V{0, 1, 1, 0}));
}

TEST(PerfNodes, LinkBytesPerRankUsesTheLogicalRowSizes) {
  const ref::Routing r = handRouting();
  const int H = 7168;
  // HT: 2 RDMA rows and 4 NVLink rows over 4 ranks.
  LinkBytes b = linkBytesPerRank(Mode::kHt, "dispatch", DType::kFp8, H, r, 2);
  EXPECT_DOUBLE_EQ(b.rdma_per_rank, 2 * htDispatchBytes(1, H, DType::kFp8) / 4);
  EXPECT_DOUBLE_EQ(b.nvl_per_rank, 4 * htDispatchBytes(1, H, DType::kFp8) / 4);
  b = linkBytesPerRank(Mode::kHt, "notify_dispatch", DType::kBf16, H, r, 2);
  EXPECT_DOUBLE_EQ(b.rdma_per_rank, 2.0 * H * 2 / 4);
  b = linkBytesPerRank(Mode::kHt, "combine", DType::kFp8, H, r, 2);  // bf16 partials whatever the dispatch dtype
  EXPECT_DOUBLE_EQ(b.rdma_per_rank, 2.0 * H * 2 / 4);
  EXPECT_DOUBLE_EQ(b.nvl_per_rank, 4.0 * H * 2 / 4);
  // LL: 3 RDMA and 2 NVLink messages.
  b = linkBytesPerRank(Mode::kLl, "dispatch_send", DType::kFp8, H, r, 2);
  EXPECT_DOUBLE_EQ(b.rdma_per_rank, 3 * llDispatchBytes(1, H, DType::kFp8) / 4);
  EXPECT_DOUBLE_EQ(b.nvl_per_rank, 2 * llDispatchBytes(1, H, DType::kFp8) / 4);
  b = linkBytesPerRank(Mode::kLl, "combine_recv", DType::kFp8, H, r, 2);
  EXPECT_DOUBLE_EQ(b.rdma_per_rank, 3.0 * H * 2 / 4);
  // One node (layout not given, or all ranks on one node): null.
  for (int rpn : {0, 4}) {
    b = linkBytesPerRank(Mode::kHt, "dispatch", DType::kBf16, H, r, rpn);
    EXPECT_LT(b.rdma_per_rank, 0);
    EXPECT_LT(b.nvl_per_rank, 0);
  }
}

// Against the traffic matrix (independent code): one rank per node sends every (token, other rank) over RDMA and
// nothing over NVLink; one node of all ranks sends the same over NVLink. Group-limited routing to one node crosses
// RDMA at most once per token. HT never sends more RDMA rows than LL (it deduplicates per node).
TEST(PerfNodes, LinkRowsAgreeWithTheTrafficMatrix) {
  for (uint64_t seed = 1; seed <= 6; ++seed) {
    ref::RoutingSpec spec;
    spec.num_ranks = 8;
    spec.num_experts = 64;
    spec.topk = 1 + static_cast<int>(seed % 8);
    spec.num_tokens = 50;
    spec.masked_fraction = seed % 2 ? 0.2 : 0.0;
    spec.seed = seed;
    const ref::Routing r = ref::make_routing(spec);
    const std::vector<int64_t> m = ref::traffic_matrix(r);
    int64_t off_diagonal = 0;
    for (int s = 0; s < 8; ++s)
      for (int d = 0; d < 8; ++d) off_diagonal += s != d ? m[s * 8 + d] : 0;
    const auto total = [](const V& v) {
      int64_t n = 0;
      for (int64_t x : v) n += x;
      return n;
    };
    for (const LinkRows& rows : {htDispatchLinkRows(r, 1), llDispatchLinkRows(r, 1)}) {
      EXPECT_EQ(total(rows.rdma_send), off_diagonal);
      EXPECT_EQ(total(rows.rdma_recv), off_diagonal);
      EXPECT_EQ(total(rows.nvl_send), 0);
    }
    for (const LinkRows& rows : {htDispatchLinkRows(r, 8), llDispatchLinkRows(r, 8)}) {
      EXPECT_EQ(total(rows.rdma_send), 0);
      EXPECT_EQ(total(rows.nvl_send), off_diagonal);
      EXPECT_EQ(total(rows.nvl_recv), off_diagonal);
    }
    for (int rpn : {2, 4}) {
      const LinkRows ht = htDispatchLinkRows(r, rpn), ll = llDispatchLinkRows(r, rpn);
      EXPECT_LE(total(ht.rdma_send), total(ll.rdma_send));
      EXPECT_EQ(total(ht.rdma_send), total(ht.rdma_recv));
      EXPECT_EQ(total(ht.nvl_send), total(ht.nvl_recv));
      // LL moves each (token, other rank) exactly once, over one of the two links.
      EXPECT_EQ(total(ll.rdma_send) + total(ll.nvl_send), off_diagonal);
    }
    spec.group_nodes = 1;
    spec.ranks_per_node = 2;
    const ref::Routing g = ref::make_routing(spec);
    const LinkRows gh = htDispatchLinkRows(g, 2);
    for (int s = 0; s < 8; ++s) EXPECT_LE(gh.rdma_send[s], g.ranks[s].num_tokens);
  }
}

TEST(PerfNodes, RowsCarryNodesAndLinkBytes) {
  ProblemSpec spec;
  spec.mode = Mode::kHt;
  spec.num_ranks = 4;
  spec.tokens = 16;
  spec.hidden = 128;
  spec.topk = 4;
  spec.experts = 16;
  spec.build_expected = false;
  RunInfo run;
  // One node: nodes 1, link bytes null, the table line and JSON otherwise as before.
  const ResultRow one = makeRow(run, buildProblem(spec), "dispatch", 0, true);
  EXPECT_EQ(one.nodes, 1);
  const std::string j1 = toJson(one);
  EXPECT_TRUE(has(j1, "\"nodes\":1,\"rdma_bytes_per_rank\":null,\"nvl_bytes_per_rank\":null")) << j1;
  EXPECT_FALSE(has(tableRow(one), "nodes"));
  // Two nodes: the row's bytes are linkBytesPerRank's.
  spec.ranks_per_node = 2;
  const Problem p = buildProblem(spec);
  for (const char* op : {"dispatch", "combine"}) {
    const ResultRow two = makeRow(run, p, op, 0, true);
    const LinkBytes want = linkBytesPerRank(Mode::kHt, op, DType::kBf16, 128, p.routing, 2);
    EXPECT_EQ(two.nodes, 2);
    EXPECT_GT(want.rdma_per_rank, 0);
    EXPECT_DOUBLE_EQ(two.rdma_bytes_per_rank, want.rdma_per_rank);
    EXPECT_DOUBLE_EQ(two.nvl_bytes_per_rank, want.nvl_per_rank);
    const std::string j2 = toJson(two);
    EXPECT_TRUE(has(j2, "\"nodes\":2,\"rdma_bytes_per_rank\":")) << j2;
    EXPECT_FALSE(has(j2, "rdma_bytes_per_rank\":null")) << j2;
    EXPECT_TRUE(has(tableRow(two), "[2 nodes: RDMA ")) << tableRow(two);
    // The logical bytes do not depend on the layout.
    EXPECT_DOUBLE_EQ(two.bytes_per_rank, makeRow(run, buildProblem([&] {
                                                   ProblemSpec s1 = spec;
                                                   s1.ranks_per_node = 0;
                                                   return s1;
                                                 }()),
                                                 op, 0, true)
                                             .bytes_per_rank);
  }
}

}  // namespace
}  // namespace nccl_moe::perf
