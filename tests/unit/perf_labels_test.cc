// moe-perf's labels: which runs count as ranks sharing a GPU (perf/run_common.h distinctGpus, makeRow), and the rows
// of a multi-node communicator (software NIC).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "link_bytes.h"
#include "problem.h"
#include "report.h"
#include "run_common.h"
#include "transport.h"

namespace nccl_moe::perf {
namespace {

TEST(PerfLabels, DistinctGpusCountsHostAndBusIdPairs) {
  // Two processes on GPU 0 of one host (MPI or --procs on a one-GPU machine): one GPU.
  EXPECT_EQ(1, distinctGpus({"h", "h"}, {"0000:19:00.0", "0000:19:00.0"}));
  // One rank per GPU.
  EXPECT_EQ(4, distinctGpus({"h", "h", "h", "h"}, {"0000:19:00.0", "0000:3B:00.0", "0000:4C:00.0", "0000:5D:00.0"}));
  // The same bus id on two hosts is two GPUs.
  EXPECT_EQ(2, distinctGpus({"a", "b"}, {"0000:19:00.0", "0000:19:00.0"}));
  // Four ranks on two GPUs.
  EXPECT_EQ(2, distinctGpus({"h", "h", "h", "h"}, {"0000:19:00.0", "0000:19:00.0", "0000:3B:00.0", "0000:3B:00.0"}));
  EXPECT_EQ(0, distinctGpus({}, {}));
}

// Rows of a multi-node communicator (internode LL on virtual nodes, RunInfo::comm_nodes > 1): the communicator's
// layout gives `nodes` and the link bytes; JSON and every table line carry the software NIC's label.
TEST(PerfLabels, RowsOfAMultiNodeCommunicatorSaySoftwareNic) {
  ProblemSpec spec;
  spec.mode = Mode::kLl;
  spec.dtype = DType::kFp8;
  spec.num_ranks = 4;
  spec.tokens = 8;
  spec.ll_max_tokens = 8;
  spec.hidden = 128;
  spec.topk = 4;
  spec.experts = 16;
  spec.build_expected = false;
  RunInfo run;
  run.num_gpus = 1;
  run.ranks_per_gpu = 4;
  run.comm_nodes = 2;
  spec.ranks_per_node = layoutRanksPerNode(0, 4, run.comm_nodes);
  const Problem p = buildProblem(spec);
  const std::string label = kSoftNicLabel;
  for (const char* op : {"dispatch", "combine", "dispatch_send", "dispatch_recv", "combine_send", "combine_recv"}) {
    ResultRow row = makeRow(run, p, op, 0, false);
    row.available = true;
    row.checked = true;
    row.median_us = 100;
    EXPECT_EQ(2, row.nodes) << op;
    EXPECT_TRUE(row.software_nic) << op;
    EXPECT_TRUE(row.shared_gpu) << op;
    const LinkBytes want = linkBytesPerRank(Mode::kLl, op, DType::kFp8, 128, p.routing, 2);
    EXPECT_DOUBLE_EQ(want.rdma_per_rank, row.rdma_bytes_per_rank) << op;
    EXPECT_DOUBLE_EQ(want.nvl_per_rank, row.nvl_bytes_per_rank) << op;
    EXPECT_GT(row.rdma_bytes_per_rank, 0) << op;
    const std::string j = toJson(row);
    EXPECT_NE(std::string::npos, j.find("\"nodes\":2,")) << j;
    EXPECT_NE(std::string::npos,
              j.find("\"transport\":\"software_nic\",\"software_nic\":true,\"label\":\"" + label + "\""))
        << j;
    EXPECT_NE(std::string::npos, j.find("\"verified\":true")) << j;  // verified like any other row
    const std::string t = tableRow(row);
    EXPECT_NE(std::string::npos, t.find("[" + label + "]")) << t;
    EXPECT_NE(std::string::npos, t.find("[2 nodes: RDMA ")) << t;
    EXPECT_NE(std::string::npos, t.find("[shared GPU: correctness only]")) << t;
    ResultRow failed = row;
    failed.available = false;
    failed.error = "x";
    EXPECT_NE(std::string::npos, tableRow(failed).find("[" + label + "]"));
  }
  // One node: none of the keys, and the table has no label (output as before).
  RunInfo one = run;
  one.comm_nodes = 1;
  ProblemSpec s1 = spec;
  s1.ranks_per_node = layoutRanksPerNode(0, 4, 1);
  const ResultRow r1 = makeRow(one, buildProblem(s1), "dispatch", 0, false);
  EXPECT_FALSE(r1.software_nic);
  EXPECT_EQ(1, r1.nodes);
  for (const char* key : {"\"transport\"", "\"software_nic\"", "\"label\""})
    EXPECT_EQ(std::string::npos, toJson(r1).find(key)) << key;
  EXPECT_EQ(std::string::npos, tableRow(r1).find(label));
  // CPU rows never are.
  EXPECT_FALSE(makeRow(run, p, "dispatch", 0, true).software_nic);
}

}  // namespace
}  // namespace nccl_moe::perf
