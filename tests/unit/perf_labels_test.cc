// moe-perf's labels: which runs count as ranks sharing a GPU (perf/run_common.h distinctGpus, makeRow).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "run_common.h"

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

}  // namespace
}  // namespace nccl_moe::perf
