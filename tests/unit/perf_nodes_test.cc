// moe-perf on several nodes, CPU only: --ranks-per-node and --routing group:<g> (parsing, the rank-dependent
// checks, the routing a problem gets), and the RDMA / NVLink byte accounting of the internode paths.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "options.h"
#include "problem.h"

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

}  // namespace
}  // namespace nccl_moe::perf
