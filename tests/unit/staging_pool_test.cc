// StagingPool: the fixed staging arena of the CUDA software-NIC backend (src/transport/emulated/staging_pool.h).
#include "transport/emulated/staging_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "transport/emulated/chaos.h"

namespace nccl_moe::emulated {
namespace {

TEST(StagingPool, AlignsAndFillsExactly) {
  StagingPool pool(4096, 256);
  EXPECT_EQ(0u, pool.allocate(1));
  EXPECT_EQ(256u, pool.allocate(256));
  EXPECT_EQ(512u, pool.allocate(0));  // zero bytes still get a distinct piece
  EXPECT_EQ(768u, pool.allocate(4096 - 768));
  EXPECT_EQ(StagingPool::kNoSpace, pool.allocate(1));
  EXPECT_EQ(4096u, pool.bytesInUse());
  EXPECT_EQ(0u, pool.numFreeRanges());
}

TEST(StagingPool, RejectsRequestsLargerThanTheArena) {
  StagingPool pool(1000, 256);  // capacity rounds down to 768
  EXPECT_EQ(768u, pool.capacity());
  EXPECT_EQ(StagingPool::kNoSpace, pool.allocate(769));
  EXPECT_EQ(StagingPool::kNoSpace, pool.allocate(~0ull));
  EXPECT_EQ(0u, pool.allocate(768));
}

TEST(StagingPool, ReleaseCoalescesBothNeighbours) {
  StagingPool pool(1024, 256);
  const uint64_t a = pool.allocate(256), b = pool.allocate(256), c = pool.allocate(256), d = pool.allocate(256);
  EXPECT_TRUE(pool.release(a));
  EXPECT_TRUE(pool.release(c));
  EXPECT_EQ(2u, pool.numFreeRanges());
  EXPECT_EQ(StagingPool::kNoSpace, pool.allocate(512));  // fragmented: no 512 run
  EXPECT_TRUE(pool.release(b));                          // joins a, b, c
  EXPECT_EQ(1u, pool.numFreeRanges());
  EXPECT_EQ(768u, pool.largestFree());
  EXPECT_EQ(0u, pool.allocate(768));
  EXPECT_TRUE(pool.release(d));
  EXPECT_FALSE(pool.release(d));      // double free is refused
  EXPECT_FALSE(pool.release(12345));  // never handed out
  EXPECT_EQ(768u, pool.bytesInUse());
}

// Random allocate/release against a shadow of live pieces: pieces never overlap, stay inside the arena, and the
// arena is whole again at the end.
TEST(StagingPool, RandomChurnKeepsPiecesDisjoint) {
  StagingPool pool(1u << 20, 256);
  ChaosRng rng(0x5eed);
  struct Piece {
    uint64_t offset, bytes;
  };
  std::vector<Piece> live;
  for (int i = 0; i < 20000; ++i) {
    if (!live.empty() && rng.chance(1, 2)) {
      const size_t k = rng.below(live.size());
      ASSERT_TRUE(pool.release(live[k].offset));
      live.erase(live.begin() + static_cast<long>(k));
      continue;
    }
    const uint64_t bytes = 1 + rng.below(64 * 1024);
    const uint64_t off = pool.allocate(bytes);
    if (off == StagingPool::kNoSpace) continue;
    ASSERT_EQ(0u, off % 256);
    ASSERT_LE(off + bytes, pool.capacity());
    for (const Piece& p : live) ASSERT_TRUE(off + bytes <= p.offset || p.offset + p.bytes <= off) << "overlap";
    live.push_back(Piece{off, bytes});
  }
  for (const Piece& p : live) ASSERT_TRUE(pool.release(p.offset));
  EXPECT_EQ(0u, pool.bytesInUse());
  EXPECT_EQ(1u, pool.numFreeRanges());
  EXPECT_EQ(pool.capacity(), pool.largestFree());
  EXPECT_GT(pool.highWater(), 0u);
}

}  // namespace
}  // namespace nccl_moe::emulated
