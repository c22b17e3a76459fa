// Rank masks (config.enable_rank_masks) in the low-latency calls, against the CPU reference with the same mask
// (ref::ll_dispatch / ref::ll_combine leave masked ranks out). Four ranks, one per GPU when the machine has four,
// else all on GPU 0 (tests/gpu/gpu_world.h).
//   LlMask.StoppedRankIsMaskedThenRejoins: rank 3 stops calling after a few iterations; the other three mask it in
//     the next call, within NCCL_MOE_TIMEOUT_S (2 s here), and produce the reference's results without rank 3 for
//     100 further iterations (bf16 / fp8, split and fused halves, weights to the dispatch, the combine or both);
//     then all four clear the mask (rank 3 rejoins) and the results are the full reference's again.
//   LlMask.SetMaskLeavesARankOutThenClearBringsItBack: ranks 0, 1 and 3 mask rank 2 with ncclMoeSetRankMask (rank 2
//     does not call), run 20 iterations without it, then all four clear the mask and run with it again.
// Every iteration compares dispatch outputs (counts, rows, scales, source info) and combine outputs bit for bit.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "harness/scoped_env.h"
#include "ll_case.h"
#include "ll_world.h"
#include "nccl_moe.h"

namespace {

namespace ref = nccl_moe::ref;
using ll_test::Barrier;
using ll_test::Expected;
using ll_test::forEachRankIn;
using ll_test::makeExpected;
using ll_test::Placement;
using ll_test::Problem;
using ll_test::Rank;
using ll_test::RankResult;

constexpr int kRanks = 4;

ncclMoeConfig_t maskConfig() {
  ncclMoeConfig_t c = ll_test::testConfig(kRanks);
  c.enable_rank_masks = 1;
  return c;
}

// Iteration `it`'s problem: the modes cycle with it (dtype and scale format, top-k, where the weights go).
Problem iterationProblem(int it) {
  Problem pb = ll_test::testProblem(kRanks, 4000 + static_cast<uint64_t>(it));
  pb.fp8 = it % 2 == 1;
  pb.format = static_cast<ref::ScaleFormat>(it % 3);
  pb.topk = 1 + it % 9;
  pb.weights = it % 3;
  pb.masked = it % 4 == 2 ? 0.2 : 0.0;
  return pb;
}

// One LL dispatch + combine (split into send and receive halves every third iteration), checked bit for bit.
void runChecked(Rank& rk, RankResult& res, const Expected& ex, int it, const std::string& what) {
  const bool split = it % 3 == 0;
  rk.uploadInputs(ex, res);
  rk.dispatch(ex, res, split ? ncclMoePhaseSend : ncclMoePhaseBoth);
  if (split) rk.dispatch(ex, res, ncclMoePhaseRecv);
  rk.checkDispatch(ex, res, what);
  rk.uploadExpertOutputs(ex, res, false);
  rk.combine(ex, res, split ? ncclMoePhaseSend : ncclMoePhaseBoth, false);
  if (split) rk.combine(ex, res, ncclMoePhaseRecv, false);
  rk.checkCombine(ex, res, what);
}

std::vector<int> hostMask(Rank& rk) {
  std::vector<int> m(rk.R, -1);
  EXPECT_EQ(ncclSuccess, ncclMoeQueryRankMask(rk.comm, m.data(), 0, rk.stream)) << ncclMoeGetLastError(rk.comm);
  return m;
}

std::vector<int> asInts(const std::vector<uint8_t>& m) { return std::vector<int>(m.begin(), m.end()); }

void expectNoAsyncError(Rank& rk) {
  ncclResult_t async = ncclSuccess;
  EXPECT_EQ(ncclSuccess, ncclMoeCommGetAsyncError(rk.comm, &async));
  EXPECT_EQ(ncclSuccess, async) << "rank " << rk.rank << ": " << ncclMoeGetLastError(rk.comm);
}

// Counts a rank out of a phase however its thread leaves it (a failed ASSERT returns early), so that a rank waiting
// for the others never waits past them.
struct DoneOnExit {
  std::atomic<int>* done;
  ~DoneOnExit() { done->fetch_add(1); }
};

void waitFor(const std::atomic<int>& done, int count) {
  for (int i = 0; i < 60000 && done.load() < count; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

TEST(LlMask, StoppedRankIsMaskedThenRejoins) {
  Placement world;
  GPU_WORLD_OR_SKIP(kRanks, &world);
  const harness::ScopedEnv timeout("NCCL_MOE_TIMEOUT_S", "2");  // read at init
  constexpr double kTimeoutS = 2.0;
  constexpr int kStopped = 3, kBefore = 4, kAfter = 100, kRejoined = 6;
  std::vector<uint8_t> none(kRanks, 0), without(kRanks, 0);
  without[kStopped] = 1;
  std::atomic<int> survivors_done{0};
  std::vector<double> masking_call_s(kRanks, 0.0);
  Barrier barrier(kRanks);
  forEachRankIn(world, kRanks, maskConfig(), [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, maskConfig());
    RankResult res;
    rk.allocResult(res);
    barrier.wait();
    // Masks on, nobody lost: the masked kernels give the full reference's results.
    for (int it = 0; it < kBefore; ++it)
      runChecked(rk, res, makeExpected(iterationProblem(it)), it, "before, iteration " + std::to_string(it));
    ASSERT_EQ(asInts(none), hostMask(rk));
    if (r == kStopped) {
      // Stops calling (no CUDA call either: with ranks sharing a GPU that could wait for the others' kernels).
      waitFor(survivors_done, kRanks - 1);
    } else {
      const DoneOnExit count_out{&survivors_done};
      // The first call without rank 3: every wait on it times out and masks it. Rank 3 sent nothing of this call,
      // so even this call's results are the reference's without rank 3.
      const auto t0 = std::chrono::steady_clock::now();
      runChecked(rk, res, makeExpected(iterationProblem(kBefore), &without), kBefore, "masking call");
      masking_call_s[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      ASSERT_EQ(asInts(without), hostMask(rk)) << "rank " << r;
      expectNoAsyncError(rk);
      for (int it = kBefore + 1; it <= kBefore + kAfter; ++it) {
        runChecked(rk, res, makeExpected(iterationProblem(it), &without), it,
                   "without rank 3, iteration " + std::to_string(it));
        if (::testing::Test::HasFailure()) break;
      }
      EXPECT_EQ(asInts(without), hostMask(rk)) << "rank " << r;
      expectNoAsyncError(rk);
    }
    // Rank 3 rejoins: every rank clears the mask (collective over all four; resets the LL state).
    ASSERT_EQ(ncclSuccess, ncclMoeClearRankMask(comm, stream)) << ncclMoeGetLastError(comm);
    EXPECT_EQ(asInts(none), hostMask(rk)) << "rank " << r;
    for (int it = 500; it < 500 + kRejoined; ++it)
      runChecked(rk, res, makeExpected(iterationProblem(it)), it, "rejoined, iteration " + std::to_string(it));
    expectNoAsyncError(rk);
    rk.freeResult(res);
  });
  for (int r = 0; r < kRanks; ++r) {
    if (r == kStopped) continue;
    std::printf("[ll mask] rank %d: the call that masked rank %d took %.2f s (NCCL_MOE_TIMEOUT_S=%.0f)\n", r, kStopped,
                masking_call_s[r], kTimeoutS);
    EXPECT_LT(masking_call_s[r], kTimeoutS + 2.0) << "rank " << r;
  }
}

TEST(LlMask, SetMaskLeavesARankOutThenClearBringsItBack) {
  Placement world;
  GPU_WORLD_OR_SKIP(kRanks, &world);
  constexpr int kLeftOut = 2, kMasked = 20;
  std::vector<uint8_t> none(kRanks, 0), without(kRanks, 0);
  without[kLeftOut] = 1;
  std::atomic<int> others_done{0};
  Barrier barrier(kRanks);
  forEachRankIn(world, kRanks, maskConfig(), [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, maskConfig());
    RankResult res;
    rk.allocResult(res);
    harness::DeviceBytes dev_mask;  // (allocated before the first collective call, see gpu_world.h)
    dev_mask.allocate(64);
    barrier.wait();
    for (int it = 0; it < 3; ++it)
      runChecked(rk, res, makeExpected(iterationProblem(it)), it, "before, iteration " + std::to_string(it));
    if (r == kLeftOut) {
      waitFor(others_done, kRanks - 1);
      EXPECT_EQ(asInts(none), hostMask(rk)) << "the left-out rank's own view";
    } else {
      const DoneOnExit count_out{&others_done};
      const std::vector<int> mask = asInts(without);
      ASSERT_EQ(ncclSuccess, ncclMoeSetRankMask(comm, mask.data(), stream)) << ncclMoeGetLastError(comm);
      EXPECT_EQ(mask, hostMask(rk)) << "rank " << r;
      for (int it = 100; it < 100 + kMasked; ++it) {
        runChecked(rk, res, makeExpected(iterationProblem(it), &without), it,
                   "without rank 2, iteration " + std::to_string(it));
        if (::testing::Test::HasFailure()) break;
      }
      expectNoAsyncError(rk);
    }
    ASSERT_EQ(ncclSuccess, ncclMoeClearRankMask(comm, stream)) << ncclMoeGetLastError(comm);
    EXPECT_EQ(asInts(none), hostMask(rk)) << "rank " << r;
    for (int it = 200; it < 205; ++it)
      runChecked(rk, res, makeExpected(iterationProblem(it)), it, "after clear, iteration " + std::to_string(it));
    // A device-side copy of the mask (stream-ordered, capturable) agrees with the host one.
    ASSERT_EQ(ncclSuccess, ncclMoeQueryRankMask(comm, dev_mask.as<int>(), 1, stream)) << ncclMoeGetLastError(comm);
    std::vector<int> copied(kRanks, -1);
    ASSERT_EQ(cudaSuccess,
              cudaMemcpyAsync(copied.data(), dev_mask.get(), sizeof(int) * kRanks, cudaMemcpyDeviceToHost, stream));
    ASSERT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
    EXPECT_EQ(asInts(none), copied);
    expectNoAsyncError(rk);
    rk.freeResult(res);
  });
}

}  // namespace
