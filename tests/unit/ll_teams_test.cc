// Receive teams of the low-latency dispatch (src/kernels/low_latency/receive_teams.h): every team block exists in
// the grid, teams appear only with at least two blocks per local expert, and the members' warps together take every
// copy item of an expert exactly once (the split dispatch.cu's copy_rows uses). A mistake here drops or doubles rows
// on GPUs with few local experts; here it is arithmetic.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/low_latency/receive_teams.h"

namespace {

using nccl_moe::ll::kMaxTeam;
using nccl_moe::ll::receive_teams;
using nccl_moe::ll::ReceiveTeams;

constexpr int kWarps = 16;  // ll::kWarps (512 threads)

TEST(LlReceiveTeams, TeamsFitTheGridAndOnlyWithTwoBlocksPerExpert) {
  for (int grid : {1, 2, 66, 132, 263, 264}) {
    for (int El = 0; El <= 600; ++El) {
      SCOPED_TRACE(testing::Message() << "grid=" << grid << " E_l=" << El);
      const ReceiveTeams t = receive_teams(El, grid);
      EXPECT_GE(t.team, 1);
      EXPECT_LE(t.team, kMaxTeam);
      EXPECT_LE(t.receivers, grid) << "every receiving block must exist";
      EXPECT_GE(t.receivers, 1) << "block 0 always receives (and acks)";
      if (t.team > 1) {
        EXPECT_GE(grid, 2 * El);
        EXPECT_EQ(t.team * El, t.receivers);
      } else {
        EXPECT_EQ(El == 0 ? 1 : (El < grid ? El : grid), t.receivers);
        if (El > 0) EXPECT_LT(grid, 2 * El) << "two blocks per expert left unused";
      }
    }
  }
}

TEST(LlReceiveTeams, MembersCopyEveryItemOnce) {
  for (int team = 1; team <= kMaxTeam; ++team) {
    for (int items : {0, 1, 15, 16, 17, 50, 127, 1000}) {
      std::vector<int> seen(static_cast<size_t>(items), 0);
      for (int member = 0; member < team; ++member)
        for (int warp = 0; warp < kWarps; ++warp)
          for (int item = member * kWarps + warp; item < items; item += team * kWarps)
            ++seen[static_cast<size_t>(item)];
      for (int i = 0; i < items; ++i) EXPECT_EQ(1, seen[static_cast<size_t>(i)]) << "team " << team << " item " << i;
    }
  }
}

}  // namespace
