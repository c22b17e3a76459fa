// moe-perf's host-side meeting points of rank threads, on the CPU: the HostExchange behind the host collectives of
// ranks that share a GPU (every rank gets every rank's data in rank order, reductions give every rank the same bits,
// every wait is bounded) and the CPU baseline's rank team (a failing rank does not leave the others waiting forever).
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu_baseline.h"
#include "host_exchange.h"

namespace nccl_moe::perf {
namespace {

// Runs fn(rank) on one thread per rank and waits for all of them.
template <typename Fn>
void onRanks(int num_ranks, Fn fn) {
  std::vector<std::thread> threads;
  for (int r = 0; r < num_ranks; ++r) threads.emplace_back([&fn, r] { fn(r); });
  for (std::thread& t : threads) t.join();
}

TEST(PerfHostExchange, AllGatherIsInRankOrder) {
  constexpr int kRanks = 4;
  HostExchange ex(kRanks, 30.0);
  std::vector<std::vector<char>> got(kRanks);
  onRanks(kRanks, [&](int r) {
    for (int round = 0; round < 3; ++round) {  // slots are reused safely round after round
      const std::vector<char> mine = {static_cast<char>('a' + r), static_cast<char>('0' + round)};
      got[static_cast<size_t>(r)] = ex.allGather(r, mine);
      const std::vector<char> expected = {'a', static_cast<char>('0' + round), 'b', static_cast<char>('0' + round),
                                          'c', static_cast<char>('0' + round), 'd', static_cast<char>('0' + round)};
      EXPECT_EQ(got[static_cast<size_t>(r)], expected) << "rank " << r << " round " << round;
    }
  });
}

TEST(PerfHostExchange, AllReduceGivesEveryRankTheSameResult) {
  constexpr int kRanks = 3;
  HostExchange ex(kRanks, 30.0);
  std::vector<std::vector<double>> mins(kRanks), maxs(kRanks), sums(kRanks);
  onRanks(kRanks, [&](int r) {
    const std::vector<double> v = {static_cast<double>(r), -static_cast<double>(r), 0.1 * (r + 1)};
    mins[static_cast<size_t>(r)] = ex.allReduce(r, v, ReduceOp::kMin);
    maxs[static_cast<size_t>(r)] = ex.allReduce(r, v, ReduceOp::kMax);
    sums[static_cast<size_t>(r)] = ex.allReduce(r, v, ReduceOp::kSum);
  });
  const double sum_in_rank_order = (0.1 * 1 + 0.1 * 2) + 0.1 * 3;
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(mins[static_cast<size_t>(r)], (std::vector<double>{0, -2, 0.1})) << r;
    EXPECT_EQ(maxs[static_cast<size_t>(r)], (std::vector<double>{2, 0, 0.1 * 3})) << r;
    ASSERT_EQ(sums[static_cast<size_t>(r)].size(), 3u);
    EXPECT_EQ(sums[static_cast<size_t>(r)][0], 3.0);
    EXPECT_EQ(sums[static_cast<size_t>(r)][1], -3.0);
    EXPECT_EQ(sums[static_cast<size_t>(r)][2], sum_in_rank_order) << "bitwise, rank order";
  }
}

TEST(PerfHostExchange, DifferentSizesAreAnError) {
  HostExchange ex(2, 30.0);
  std::vector<std::string> errors(2);
  onRanks(2, [&](int r) {
    try {
      ex.allGather(r, std::vector<char>(static_cast<size_t>(r + 1), 'x'));
    } catch (const std::runtime_error& e) {
      errors[static_cast<size_t>(r)] = e.what();
    }
  });
  for (const std::string& e : errors) EXPECT_NE(e.find("different sizes"), std::string::npos) << e;
}

TEST(PerfHostExchange, AMissingRankEndsTheWaitWithAnError) {
  HostExchange ex(2, 0.2);  // rank 1 never comes
  try {
    ex.allGather(0, {'a'});
    FAIL() << "a rank waited for a missing peer without a bound";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("did not arrive within"), std::string::npos) << e.what();
  }
  harness::HostBarrier barrier(2);
  EXPECT_THROW(meet(barrier, 0.1, "test"), std::runtime_error);
}

TEST(PerfRankTeam, AFailingRankFailsTheRunInsteadOfHangingIt) {
  RankTeam team(2, 0.2);
  std::vector<int> seen(2, 0);
  team.run([&](int r) {  // a healthy run
    team.barrier();
    seen[static_cast<size_t>(r)] = 1;
  });
  EXPECT_EQ(seen, (std::vector<int>{1, 1}));
  // Rank 1 fails before the barrier: rank 0 gives up after the timeout and run() rethrows rank 1's error.
  try {
    team.run([&](int r) {
      if (r == 1) throw std::runtime_error("rank 1 failed");
      team.barrier();
    });
    FAIL() << "run() returned although a rank failed";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_TRUE(what.find("rank 1 failed") != std::string::npos || what.find("did not reach") != std::string::npos)
        << what;
  }
  // The barrier may be out of step now: later runs are refused instead of hanging.
  EXPECT_THROW(team.run([](int) {}), std::runtime_error);
}

}  // namespace
}  // namespace nccl_moe::perf
