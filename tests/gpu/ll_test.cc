// Low-latency dispatch/combine on real GPUs against the CPU reference (src/reference/reference.h).
//
// Ranks are threads of this process calling the public API; every LlWorld.* test runs with R = 2, 4 and 8 ranks,
// one per GPU (ncclCommInitAll + ncclMoeCommInit) when the machine has R GPUs, else all on GPU 0
// (ncclMoeCommInitAll; tests/gpu/gpu_world.h). Every thread regenerates the whole seeded problem
// (routing, activations, expert outputs) and runs the reference itself, so each rank checks its own outputs without
// host-side exchange:
//   dispatch: recv_count exactly, and for every row below the count the bytes (bf16 or fp8), the scales
//             (float / pow2 float / packed ue8m0) and the source info (rank << 24 | token) bit for bit;
//   combine:  out bit for bit (ref::ll_combine's two-level order: per expert rank an fmaf chain over its slots
//             rounded to bf16, then the partials added in rank order).
// Weights go to the combine (pushed to the expert ranks), to the dispatch only (carried in the message headers,
// combine topk_weights = NULL), or to both (the combine's win; the values are the same here).
// Modes covered: bf16 and fp8 x 3 scale formats, K 1..16, masked slots, empty tokens, T = 0 on some ranks,
// int32/int64 ids, H not a multiple of 512, split send/recv halves with other GPU work in between, two results
// alive at once, zero-copy combine, CUDA-graph capture + replay with new data and routing per replay, reset,
// a few hundred random iterations (hash per seed), and a timeout naming phase/rank/peer.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "core/comm.h"
#include "core/handle.h"
#include "ll_case.h"
#include "ll_world.h"
#include "nccl_moe.h"
#include "reference/reference.h"
#include "reference/testing/compare.h"
#include "reference/testing/generators.h"

namespace {

namespace ref = nccl_moe::ref;
using ll_test::atLeast16;
using ll_test::Barrier;
using ll_test::describe;
using ll_test::DeviceBytes;
using ll_test::Expected;
using ll_test::forEachRankIn;
using ll_test::kTestTokens;
using ll_test::makeExpected;
using ll_test::Problem;
using ll_test::Rank;
using ll_test::RankResult;
using ll_test::refDispatchHash;
using ll_test::testConfig;
using ll_test::testProblem;

#define CUDA_OK(x) ASSERT_EQ(cudaSuccess, (x)) << #x

// ---------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------

LL_WORLD_TEST(DispatchCombineSweep) {
  const int n = num_ranks;
  const std::vector<Problem> problems = ll_test::sweepProblems(n, 100);
  Barrier barrier(n);
  forEachRankIn(world, n, testConfig(n), [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult res;
    rk.allocResult(res);
    DeviceBytes cumulative;
    cumulative.allocate(atLeast16(rk.El * 4));
    std::vector<int> want_cumulative(rk.El, 0);
    barrier.wait();
    for (const Problem& pb : problems) {
      const Expected ex = makeExpected(pb);
      rk.uploadInputs(ex, res);
      rk.dispatch(ex, res, ncclMoePhaseBoth, cumulative.as<int>());
      rk.checkDispatch(ex, res, describe(pb));
      rk.uploadExpertOutputs(ex, res, false);
      rk.combine(ex, res, ncclMoePhaseBoth, false);
      rk.checkCombine(ex, res, describe(pb));
      for (int j = 0; j < rk.El; ++j) want_cumulative[j] += ex.dispatch.recv[r].recv_count[j];
    }
    std::vector<int> got(rk.El);
    cudaMemcpyAsync(got.data(), cumulative.get(), rk.El * 4, cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
    EXPECT_EQ(want_cumulative, got) << "cumulative stats, rank " << r;
    rk.freeResult(res);
  });
}

// Send halves, other GPU work, receive halves; two results (two halves) alive at once; zero-copy on one.
LL_WORLD_TEST(SplitPhasesTwoResultsAliveZeroCopy) {
  const int n = num_ranks;
  Barrier barrier(n);
  forEachRankIn(world, n, testConfig(n), [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult a, b;
    rk.allocResult(a);
    rk.allocResult(b);
    DeviceBytes other;  // "compute" between the halves: a large memset
    other.allocate(atLeast16(256u << 20));
    barrier.wait();
    for (int round = 0; round < 4; ++round) {
      Problem pa = testProblem(n, 500 + round), pbb = testProblem(n, 600 + round);
      pa.fp8 = true;
      pa.format = static_cast<ref::ScaleFormat>(round % 3);
      pa.topk = 8;
      pbb.topk = 5;
      pbb.masked = 0.2;
      pbb.hidden = 512;
      const Expected ea = makeExpected(pa), eb = makeExpected(pbb);
      rk.uploadInputs(ea, a);
      rk.uploadInputs(eb, b);
      rk.dispatch(ea, a, ncclMoePhaseSend);
      CUDA_OK(cudaMemsetAsync(other.get(), round, other.bytes(), stream));
      rk.dispatch(eb, b, ncclMoePhaseSend);
      CUDA_OK(cudaMemsetAsync(other.get(), round + 1, other.bytes(), stream));
      rk.dispatch(ea, a, ncclMoePhaseRecv);
      rk.dispatch(eb, b, ncclMoePhaseRecv);
      rk.checkDispatch(ea, a, "split A " + describe(pa));
      rk.checkDispatch(eb, b, "split B " + describe(pbb));
      rk.uploadExpertOutputs(ea, a, /*zero_copy=*/true);
      rk.uploadExpertOutputs(eb, b, false);
      rk.combine(ea, a, ncclMoePhaseSend, true);
      CUDA_OK(cudaMemsetAsync(other.get(), round + 2, other.bytes(), stream));
      rk.combine(eb, b, ncclMoePhaseSend, false);
      rk.combine(ea, a, ncclMoePhaseRecv, true);
      CUDA_OK(cudaMemsetAsync(other.get(), round + 3, other.bytes(), stream));
      rk.combine(eb, b, ncclMoePhaseRecv, false);
      rk.checkCombine(ea, a, "split A " + describe(pa));
      rk.checkCombine(eb, b, "split B " + describe(pbb));
      // Both-phase calls keep working after the split ones, interleaved A/B.
      rk.dispatch(ea, a, ncclMoePhaseBoth);
      rk.dispatch(eb, b, ncclMoePhaseBoth);
      rk.uploadExpertOutputs(ea, a, false);
      rk.uploadExpertOutputs(eb, b, true);
      rk.combine(eb, b, ncclMoePhaseBoth, true);
      rk.combine(ea, a, ncclMoePhaseBoth, false);
      rk.checkDispatch(eb, b, "both B " + describe(pbb));
      rk.checkCombine(ea, a, "both A " + describe(pa));
      rk.checkCombine(eb, b, "both B " + describe(pbb));
    }
    rk.freeResult(a);
    rk.freeResult(b);
  });
}

// Capture dispatch + combine once; every replay gets new activations, new routing and new weights (same T).
LL_WORLD_TEST(GraphReplayWithNewDataAndRouting) {
  const int n = num_ranks;
  Barrier barrier(n);
  forEachRankIn(world, n, testConfig(n), [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult res;
    rk.allocResult(res);
    auto problem = [&](int replay) {
      Problem pb = testProblem(n, 700 + replay);
      pb.fp8 = true;
      pb.format = ref::ScaleFormat::kUe8m0;
      pb.topk = 6;
      pb.masked = 0.1;
      pb.tokens_per_rank.assign(n, kTestTokens);
      pb.tokens_per_rank[n - 1] = 7;  // ranks differ; T is fixed per rank across replays
      pb.weights = 1;                 // new weights per replay reach the combine through the dispatch
      return pb;
    };
    const Expected first = makeExpected(problem(0));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    rk.dispatch(first, res, ncclMoePhaseBoth);
    rk.combine(first, res, ncclMoePhaseBoth, false);
    CUDA_OK(cudaStreamEndCapture(stream, &graph));
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    barrier.wait();
    for (int replay = 0; replay < 12; ++replay) {
      const Expected ex = makeExpected(problem(replay));
      rk.uploadInputs(ex, res);
      rk.uploadExpertOutputs(ex, res, false);  // y rows follow the routing of this replay
      CUDA_OK(cudaGraphLaunch(exec, stream));
      rk.checkDispatch(ex, res, "replay " + std::to_string(replay));
      rk.checkCombine(ex, res, "replay " + std::to_string(replay));
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    // Eager calls after the replays still work (the graph used one half; the other is untouched).
    const Expected ex = makeExpected(problem(99));
    rk.uploadInputs(ex, res);
    rk.dispatch(ex, res, ncclMoePhaseBoth);
    rk.checkDispatch(ex, res, "eager after graph");
    rk.freeResult(res);
  });
}

LL_WORLD_TEST(ResetBetweenCalls) {
  const int n = num_ranks;
  Barrier barrier(n);
  forEachRankIn(world, n, testConfig(n), [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult res;
    rk.allocResult(res);
    barrier.wait();
    for (int i = 0; i < 3; ++i) {
      Problem pb = testProblem(n, 800 + i);
      pb.topk = 3 + i;
      const Expected ex = makeExpected(pb);
      rk.uploadInputs(ex, res);
      rk.dispatch(ex, res, ncclMoePhaseBoth);
      rk.uploadExpertOutputs(ex, res, false);
      rk.combine(ex, res, ncclMoePhaseBoth, false);
      rk.checkDispatch(ex, res, "reset round " + std::to_string(i));
      rk.checkCombine(ex, res, "reset round " + std::to_string(i));
      ASSERT_EQ(ncclSuccess, ncclMoeLowLatencyReset(comm, stream)) << ncclMoeGetLastError(comm);
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    ncclResult_t async = ncclSuccess;
    EXPECT_EQ(ncclSuccess, ncclMoeCommGetAsyncError(comm, &async));
    EXPECT_EQ(ncclSuccess, async);
    rk.freeResult(res);
  });
}

// A few hundred random iterations, each checked; the dispatch hash must equal the reference's and the
// combine hash is printed so a rerun with the same seed can be compared.
LL_WORLD_TEST(PressureLoop) {
  const int n = num_ranks;
  const char* env = std::getenv("NCCL_MOE_LL_PRESSURE_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 0) : 20240601ull;
  const int iterations = 300;
  std::vector<uint64_t> gpu_hash(n, ref::kFnvOffset), ref_hash(n, ref::kFnvOffset), comb_hash(n, ref::kFnvOffset);
  Barrier barrier(n);
  forEachRankIn(world, n, testConfig(n), [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult res[2];
    rk.allocResult(res[0]);
    rk.allocResult(res[1]);
    barrier.wait();
    ref::Rng rng(seed);  // identical stream on every rank
    for (int it = 0; it < iterations; ++it) {
      bool split = false, zero_copy = false;
      const Problem pb = ll_test::randomProblem(n, seed, it, rng, &split, &zero_copy);
      RankResult& cur = res[it % 2];
      const Expected ex = makeExpected(pb);
      rk.uploadInputs(ex, cur);
      rk.dispatch(ex, cur, split ? ncclMoePhaseSend : ncclMoePhaseBoth);
      if (split) rk.dispatch(ex, cur, ncclMoePhaseRecv);
      const std::string what = "iteration " + std::to_string(it) + " " + describe(pb);
      gpu_hash[r] = ref::mix_seed(gpu_hash[r], rk.checkDispatch(ex, cur, what));
      ref_hash[r] = ref::mix_seed(ref_hash[r], refDispatchHash(ex, r));
      rk.uploadExpertOutputs(ex, cur, zero_copy);
      rk.combine(ex, cur, split ? ncclMoePhaseSend : ncclMoePhaseBoth, zero_copy);
      if (split) rk.combine(ex, cur, ncclMoePhaseRecv, zero_copy);
      comb_hash[r] = ref::mix_seed(comb_hash[r], rk.checkCombine(ex, cur, what));
      if (::testing::Test::HasFailure()) break;
    }
    rk.freeResult(res[0]);
    rk.freeResult(res[1]);
  });
  uint64_t g = ref::kFnvOffset, w = ref::kFnvOffset, c = ref::kFnvOffset;
  for (int r = 0; r < n; ++r) {
    g = ref::mix_seed(g, gpu_hash[r]);
    w = ref::mix_seed(w, ref_hash[r]);
    c = ref::mix_seed(c, comb_hash[r]);
  }
  std::printf(
      "[ll pressure] seed %llu, %d iterations, %d ranks: dispatch hash %016llx (reference %016llx), combine "
      "hash %016llx\n",
      static_cast<unsigned long long>(seed), iterations, n, static_cast<unsigned long long>(g),
      static_cast<unsigned long long>(w), static_cast<unsigned long long>(c));
  EXPECT_EQ(w, g);
}

// Rank 1 posts its dispatch send half and then skips everything else; every other rank's combine must time
// out, and rank 0's error must name the phase, itself and peer 1.
LL_WORLD_TEST(TimeoutNamesPhaseRankPeer) {
  const int n = num_ranks;
  const char* old_timeout = std::getenv("NCCL_MOE_TIMEOUT_S");
  const std::string saved_timeout = old_timeout ? old_timeout : "";
  setenv("NCCL_MOE_TIMEOUT_S", "1", 1);
  std::string message;
  ncclResult_t async_error = ncclSuccess;
  std::atomic<int> others_done{0};
  Barrier barrier(n);
  forEachRankIn(world, n, testConfig(n), [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult res;
    rk.allocResult(res);
    const Expected ex = makeExpected(testProblem(n, 900));
    barrier.wait();
    rk.uploadInputs(ex, res);
    if (r == 1) {
      rk.dispatch(ex, res, ncclMoePhaseSend);  // ... and never the receive half, nor the combine
      CUDA_OK(cudaStreamSynchronize(stream));
      // Keep this rank's buffer alive until the others are done (their combines write weights into it).
      for (int i = 0; i < 3000 && others_done.load() < n - 1; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    } else {
      rk.dispatch(ex, res, ncclMoePhaseBoth);
      rk.uploadExpertOutputs(ex, res, false);
      rk.combine(ex, res, ncclMoePhaseBoth, false);
      EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream));  // the kernel leaves cleanly
      ncclResult_t async = ncclSuccess;
      EXPECT_EQ(ncclSuccess, ncclMoeCommGetAsyncError(comm, &async));
      EXPECT_NE(ncclSuccess, async) << "rank " << r;
      if (r == 0) {
        async_error = async;
        message = ncclMoeGetLastError(comm);
      }
      // Every later call reports the error.
      ncclMoeLLDispatchArgs_t a = rk.dispatchArgs(ex, res, ncclMoePhaseBoth);
      EXPECT_NE(ncclSuccess, ncclMoeLowLatencyDispatch(comm, res.handle, &a, stream));
      others_done.fetch_add(1);
    }
    rk.freeResult(res);
  });
  if (old_timeout != nullptr)
    setenv("NCCL_MOE_TIMEOUT_S", saved_timeout.c_str(), 1);
  else
    unsetenv("NCCL_MOE_TIMEOUT_S");
  EXPECT_NE(ncclSuccess, async_error);
  EXPECT_NE(std::string::npos, message.find("ll-combine-recv")) << message;
  EXPECT_NE(std::string::npos, message.find("rank 0")) << message;
  EXPECT_NE(std::string::npos, message.find("peer 1")) << message;
  std::printf("[ll timeout] rank 0 reported: %s\n", message.c_str());
}

}  // namespace

INSTANTIATE_TEST_SUITE_P(Ranks, LlWorld, ::testing::ValuesIn(gpu_test::rankCounts()), gpu_test::ranksName);
