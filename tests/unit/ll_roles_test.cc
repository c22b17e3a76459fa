// The low-latency dispatch's send roles (src/kernels/low_latency/send_roles.h): for every grid, token count and
// rank count, every local and remote item lands on a block that arrives for its class, the arriving blocks'
// shares of each class sum to exactly kLlArrivalUnits (a receiver's counter completes once, never early), and the
// count block exists. A block's receiver role is independent of these, so a mistake here hangs or corrupts the
// dispatch on GPUs; here it is pure arithmetic.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/low_latency/send_roles.h"

namespace {

using nccl_moe::kLlArrivalUnits;
using nccl_moe::ll::arrival_share;
using nccl_moe::ll::send_roles;
using nccl_moe::ll::SendRoles;

TEST(LlSendRoles, EveryItemArrivesAndSharesSumToOneUnitPerClass) {
  for (int grid : {1, 2, 3, 7, 132, 264}) {
    for (int T : {0, 1, 2, 5, 64, 128, 131, 132, 133, 255, 256, 263, 264, 265, 528, 1000, 4096}) {
      for (int R : {1, 2, 3, 8}) {
        SCOPED_TRACE(testing::Message() << "grid=" << grid << " T=" << T << " R=" << R);
        long long local_sum = 0, remote_sum = 0;
        std::vector<int> local_item_block(static_cast<size_t>(T), -1), remote_item_block(static_cast<size_t>(T), -1);
        int count_blocks = 0;
        for (int b = 0; b < grid; ++b) {
          const SendRoles r = send_roles(b, grid, T, R);
          if (r.local_arrives) local_sum += arrival_share(b, r.senders);
          if (r.remote_arrives) remote_sum += arrival_share(r.remote_index, r.senders);
          if (b == r.count_block) ++count_blocks;
          // The kernel's item loops: remote tokens remote_index, +grid, ...; local tokens b, b + grid, ...
          bool any = false;
          if (R > 1)
            for (int t = r.remote_index; t < T; t += grid) {
              remote_item_block[static_cast<size_t>(t)] = b;
              any = true;
              EXPECT_TRUE(r.remote_arrives) << "block " << b << " stores remote token " << t << " but never arrives";
            }
          for (int t = b; t < T; t += grid) {
            local_item_block[static_cast<size_t>(t)] = b;
            any = true;
            EXPECT_TRUE(r.local_arrives) << "block " << b << " stores local token " << t << " but never arrives";
          }
          EXPECT_EQ(any, r.has_items) << "block " << b;
        }
        EXPECT_EQ(kLlArrivalUnits, local_sum);
        EXPECT_EQ(R > 1 ? kLlArrivalUnits : 0, remote_sum);
        EXPECT_EQ(1, count_blocks);
        for (int t = 0; t < T; ++t) {
          EXPECT_GE(local_item_block[static_cast<size_t>(t)], 0) << "local token " << t << " has no block";
          if (R > 1) EXPECT_GE(remote_item_block[static_cast<size_t>(t)], 0) << "remote token " << t << " has no block";
        }
      }
    }
  }
}

TEST(LlSendRoles, SmallBatchesKeepLocalAndRemoteItemsOnSeparateBlocks) {
  // 2T <= grid: no block stores both locally and remotely (so the local class publishes without NVLink), and the
  // count block has no item.
  const int grid = 264;
  for (int T : {1, 8, 32, 128, 132}) {
    for (int b = 0; b < grid; ++b) {
      const SendRoles r = send_roles(b, grid, T, 2);
      EXPECT_FALSE(b < T && r.remote_index < T) << "T=" << T << " block " << b;
    }
    if (2 * T < grid) EXPECT_FALSE(send_roles(T % grid, grid, T, 2).has_items) << "T=" << T;
  }
}

}  // namespace
