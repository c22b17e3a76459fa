// Internode low-latency dispatch/combine (src/kernels/low_latency_net/) on virtual nodes: all ranks are threads of
// this process on GPU 0 (ncclMoeCommInitAll), split into nodes by NCCL_MOE_EMULATE_NODES, with the software NIC as
// the scale-out transport (NCCL_MOE_NET=emulated) and its chaos mode on (NCCL_MOE_EMU_CHAOS: writes split and
// reordered, sources read late, QPs interleaved). Same-node peers go through NVLink stores, other-node peers
// through the WQEs the kernels post. Every output is compared bit for bit with the CPU reference (the checks of
// ll_case.h, shared with the intranode LL tests):
//
//   Shapes/LlNet.MatchesReferenceSweep        bf16 and fp8 x 3 scale formats, K 1..16, masked slots, empty
//                                             tokens, zero-token ranks, int32/int64 ids, weights to the combine,
//                                             to the dispatch only, or both; cumulative stats
//   Shapes/LlNet.SplitPhasesTwoResultsAliveZeroCopy
//                                             send halves, other GPU work, receive halves; two results alive;
//                                             zero-copy combine on one of them
//   Shapes/LlNet.RandomIterationsHashThenReset
//                                             random problems (NCCL_MOE_NET_TEST_ITERATIONS, default 30; the
//                                             issue's stress run uses 300), both-phase or split, zero-copy or not;
//                                             prints a hash of every compared byte; then a reset and one more check
//   Shapes/LlNet.GraphReplayWithNewDataAndRouting
//                                             dispatch + combine captured once, 12 replays with new data, routing
//                                             and weights, then eager calls on the other half
//   Shapes/LlNet.SkippedCallTimesOutNamingPhaseAndPeer
//                                             the last rank skips a dispatch: every other rank's call fails within
//                                             the timeout with a message naming the phase and the peer (and the QP
//                                             when the peer is on another node)
// Shapes: 2x1, 2x2, 4x1, 2x4 (nodes x ranks per node), each in ibgda mode and in proxy mode ("2x2_proxy":
// NCCL_MOE_NET_MODE=proxy, the request proxy posts for the kernels), plus 2x2_pure and 2x4_pure
// (NCCL_MOE_NET_PURE_RDMA=1: the LL kernels reach same-node ranks through the NIC too; tests/gpu/net_world.h).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/comm.h"
#include "core/handle.h"
#include "gpu_world.h"
#include "harness/scoped_env.h"
#include "ll_case.h"
#include "ll_world.h"
#include "nccl_moe.h"
#include "net_world.h"
#include "reference/reference.h"
#include "reference/testing/generators.h"

namespace {

namespace ref = nccl_moe::ref;
using ll_test::atLeast16;
using ll_test::Barrier;
using ll_test::describe;
using ll_test::DeviceBytes;
using ll_test::Expected;
using ll_test::makeExpected;
using ll_test::Problem;
using ll_test::Rank;
using ll_test::RankResult;
using ll_test::testConfig;
using ll_test::testProblem;
using net_test::NetEnv;
using net_test::Shape;
using net_test::shapeName;

// This rank's internode LL state (epochs, last-block counters, every signal word) of both halves, for a failure
// message: which wait would have passed too early or which call did not arrive.
std::string netState(ncclMoeComm_t comm, cudaStream_t stream) {
  cudaStreamSynchronize(stream);
  const nccl_moe::LlNetLayout& L = comm->layout.ll_net;
  std::string out;
  for (int half = 0; half < 2; ++half) {
    const uint8_t* base = comm->buffer + comm->layout.ll_net_half(half);
    nccl_moe::LlNetControl ctl{};
    cudaMemcpy(&ctl, base + L.control(), sizeof(ctl), cudaMemcpyDeviceToHost);
    std::vector<long long> sig(static_cast<size_t>(nccl_moe::kLlNetSignalKinds) * L.num_ranks);
    cudaMemcpy(sig.data(), base + L.signal(0, 0), sig.size() * 8, cudaMemcpyDeviceToHost);
    char line[256];
    std::snprintf(line, sizeof(line), "\n  half %d: dispatch_epoch %lld combine_epoch %lld done %d %d %d %d", half,
                  ctl.dispatch_epoch, ctl.combine_epoch, ctl.send_done, ctl.recv_done, ctl.comb_send_done,
                  ctl.comb_recv_done);
    out += line;
    for (int k = 0; k < nccl_moe::kLlNetSignalKinds; ++k) {
      out += "\n    kind " + std::to_string(k) + ":";
      for (int s = 0; s < L.num_ranks; ++s) {
        const long long v = sig[static_cast<size_t>(k) * L.num_ranks + s];
        out += " " + (k == nccl_moe::kNetDispCount || k == nccl_moe::kNetWeightFlag
                          ? std::to_string(v >> 32) + ":" + std::to_string(v & 0xffffffff)
                          : std::to_string(v));
      }
    }
  }
  return out;
}

// For the first token whose combine output is wrong on `rank`: each expert rank's partial as the reference computes
// it next to what this rank's comb_recv row holds (first 4 channels), to tell a missing, stale or wrong partial.
std::string explainCombine(const Expected& ex, int rank, ncclMoeComm_t comm, RankResult& res, cudaStream_t stream) {
  cudaStreamSynchronize(stream);
  const ref::RankRouting& rr = ex.routing.ranks[rank];
  const int T = rr.num_tokens, H = ex.pb.hidden, K = ex.pb.topk, El = ex.routing.num_local_experts();
  std::vector<uint16_t> out(static_cast<size_t>(T) * H);
  cudaMemcpy(out.data(), res.out.get(), out.size() * 2, cudaMemcpyDeviceToHost);
  int bad = -1;
  for (int t = 0; t < T && bad < 0; ++t)
    for (int c = 0; c < H; ++c)
      if (out[static_cast<size_t>(t) * H + c] != ex.out[rank][static_cast<size_t>(t) * H + c]) {
        bad = t;
        break;
      }
  if (bad < 0) return " (no wrong token)";
  const nccl_moe::LlNetLayout& L = comm->layout.ll_net;
  const uint8_t* half = comm->buffer + comm->layout.ll_net_half(res.handle->ll.half);
  const int RM = ex.pb.num_ranks * ex.pb.max_tokens;
  std::string text =
      " first wrong token " + std::to_string(bad) + " (net half " + std::to_string(res.handle->ll.half) + "):";
  for (int d = 0; d < ex.pb.num_ranks; ++d) {
    bool holds = false;
    float acc[4] = {0, 0, 0, 0};
    for (int k = 0; k < K; ++k) {
      const int64_t e = rr.topk_idx[static_cast<size_t>(bad) * K + k];
      if (e < 0 || e / El != d) continue;
      holds = true;
      const int row = ex.dispatch.send_row[rank][static_cast<size_t>(bad) * K + k];
      for (int c = 0; c < 4; ++c)
        acc[c] = std::fmaf(rr.topk_weights[static_cast<size_t>(bad) * K + k],
                           ref::bf16_to_float(ex.y[d][(static_cast<size_t>(e % El) * RM + row) * H + c]), acc[c]);
    }
    if (!holds) continue;
    uint16_t got[4];
    cudaMemcpy(got, half + L.comb_recv_row(d, bad), sizeof(got), cudaMemcpyDeviceToHost);
    char line[200];
    std::snprintf(line, sizeof(line), "\n  partial of rank %d: want %g %g %g %g, comb_recv holds %g %g %g %g", d,
                  ref::bf16_to_float(ref::float_to_bf16(acc[0])), ref::bf16_to_float(ref::float_to_bf16(acc[1])),
                  ref::bf16_to_float(ref::float_to_bf16(acc[2])), ref::bf16_to_float(ref::float_to_bf16(acc[3])),
                  ref::bf16_to_float(got[0]), ref::bf16_to_float(got[1]), ref::bf16_to_float(got[2]),
                  ref::bf16_to_float(got[3]));
    text += line;
  }
  return text;
}

class LlNet : public ::testing::TestWithParam<Shape> {
 protected:
  void SetUp() override {
    const std::string why = net_test::cannotRun(GetParam());
    if (!why.empty()) GTEST_SKIP() << why;
  }
  // fn(rank, comm, stream) on every rank of the shape's world (all on GPU 0).
  template <typename Fn>
  void run(Fn fn) {
    const Shape s = GetParam();
    gpu_test::World world(s.ranks(), gpu_test::Placement::kOneGpu);
    ASSERT_TRUE(world.ok());
    world.runWithComms(testConfig(s.ranks()), fn);
  }
};

TEST_P(LlNet, MatchesReferenceSweep) {
  const Shape shape = GetParam();
  NetEnv env(shape);
  const int n = shape.ranks();
  const std::vector<Problem> problems = ll_test::sweepProblems(n, 7100);
  Barrier barrier(n);
  run([&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
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
      if (::testing::Test::HasFailure()) {
        ADD_FAILURE() << "rank " << r << " state after " << describe(pb) << ":" << netState(comm, stream)
                      << explainCombine(ex, r, comm, res, stream);
        break;
      }
    }
    std::vector<int> got(rk.El);
    cudaMemcpyAsync(got.data(), cumulative.get(), rk.El * 4, cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
    EXPECT_EQ(want_cumulative, got) << "cumulative stats, rank " << r;
    EXPECT_STREQ("", ncclMoeGetLastError(comm)) << "rank " << r;
    barrier.wait();  // no cudaFree while a peer's kernel still waits for this rank's NIC (docs/architecture.md)
    rk.freeResult(res);
  });
}

TEST_P(LlNet, SplitPhasesTwoResultsAliveZeroCopy) {
  const Shape shape = GetParam();
  NetEnv env(shape);
  const int n = shape.ranks();
  Barrier barrier(n);
  run([&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult a, b;
    rk.allocResult(a);
    rk.allocResult(b);
    DeviceBytes other;  // "compute" between the halves: a large memset
    other.allocate(atLeast16(64u << 20));
    barrier.wait();
    for (int round = 0; round < 4; ++round) {
      Problem pa = testProblem(n, 7500 + round), pbb = testProblem(n, 7600 + round);
      pa.fp8 = true;
      pa.format = static_cast<ref::ScaleFormat>(round % 3);
      pa.topk = 8;
      pbb.topk = 5;
      pbb.weights = round % 3;
      const Expected ea = makeExpected(pa), eb = makeExpected(pbb);
      rk.uploadInputs(ea, a);
      rk.uploadInputs(eb, b);
      rk.dispatch(ea, a, ncclMoePhaseSend);
      rk.dispatch(eb, b, ncclMoePhaseSend);
      ASSERT_EQ(cudaSuccess, cudaMemsetAsync(other.get(), round, 64u << 20, stream));
      rk.dispatch(ea, a, ncclMoePhaseRecv);
      rk.dispatch(eb, b, ncclMoePhaseRecv);
      rk.checkDispatch(ea, a, "split a " + describe(pa));
      rk.checkDispatch(eb, b, "split b " + describe(pbb));
      rk.uploadExpertOutputs(ea, a, true);
      rk.uploadExpertOutputs(eb, b, false);
      rk.combine(ea, a, ncclMoePhaseSend, true);
      rk.combine(eb, b, ncclMoePhaseSend, false);
      ASSERT_EQ(cudaSuccess, cudaMemsetAsync(other.get(), round + 1, 64u << 20, stream));
      rk.combine(ea, a, ncclMoePhaseRecv, true);
      rk.combine(eb, b, ncclMoePhaseRecv, false);
      rk.checkCombine(ea, a, "split a " + describe(pa));
      rk.checkCombine(eb, b, "split b " + describe(pbb));
      if (::testing::Test::HasFailure()) {
        ADD_FAILURE() << "rank " << r << " state after round " << round << ":" << netState(comm, stream)
                      << "\n a:" << explainCombine(ea, r, comm, a, stream)
                      << "\n b:" << explainCombine(eb, r, comm, b, stream);
        break;
      }
    }
    barrier.wait();  // no cudaFree while a peer's kernel still waits for this rank's NIC (docs/architecture.md)
    rk.freeResult(a);
    rk.freeResult(b);
  });
}

TEST_P(LlNet, RandomIterationsHashThenReset) {
  const Shape shape = GetParam();
  NetEnv env(shape);
  const int n = shape.ranks();
  const char* iters_env = std::getenv("NCCL_MOE_NET_TEST_ITERATIONS");
  const int iterations = iters_env != nullptr ? std::atoi(iters_env) : 30;
  Barrier barrier(n);
  std::vector<uint64_t> hashes(n, 0);
  const auto t0 = std::chrono::steady_clock::now();
  run([&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult res;
    rk.allocResult(res);
    ref::Rng rng(4242);  // the same stream on every rank
    uint64_t h = ref::kFnvOffset;
    barrier.wait();
    for (int it = 0; it < iterations; ++it) {
      bool split = false, zero_copy = false;
      const Problem pb = ll_test::randomProblem(n, 9001, it, rng, &split, &zero_copy);
      const Expected ex = makeExpected(pb);
      rk.uploadInputs(ex, res);
      if (split) {
        rk.dispatch(ex, res, ncclMoePhaseSend);
        rk.dispatch(ex, res, ncclMoePhaseRecv);
      } else {
        rk.dispatch(ex, res, ncclMoePhaseBoth);
      }
      h = ref::mix_seed(h, rk.checkDispatch(ex, res, "iteration " + std::to_string(it) + " " + describe(pb)));
      rk.uploadExpertOutputs(ex, res, zero_copy);
      if (split) {
        rk.combine(ex, res, ncclMoePhaseSend, zero_copy);
        rk.combine(ex, res, ncclMoePhaseRecv, zero_copy);
      } else {
        rk.combine(ex, res, ncclMoePhaseBoth, zero_copy);
      }
      h = ref::mix_seed(h, rk.checkCombine(ex, res, "iteration " + std::to_string(it) + " " + describe(pb)));
      if (::testing::Test::HasFailure()) break;
      if (r == 0 && (it + 1) % 50 == 0) std::printf("[ LlNet ] %d / %d iterations\n", it + 1, iterations);
    }
    // Reset (collective), then one more exact round on the zeroed state.
    ASSERT_EQ(ncclSuccess, ncclMoeLowLatencyReset(comm, stream)) << ncclMoeGetLastError(comm);
    Problem pb = testProblem(n, 9100);
    pb.fp8 = true;
    const Expected ex = makeExpected(pb);
    rk.uploadInputs(ex, res);
    rk.dispatch(ex, res, ncclMoePhaseBoth);
    rk.checkDispatch(ex, res, "after reset " + describe(pb));
    rk.uploadExpertOutputs(ex, res, false);
    rk.combine(ex, res, ncclMoePhaseBoth, false);
    rk.checkCombine(ex, res, "after reset " + describe(pb));
    hashes[r] = h;
    barrier.wait();  // no cudaFree while a peer's kernel still waits for this rank's NIC (docs/architecture.md)
    rk.freeResult(res);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  uint64_t all = ref::kFnvOffset;
  for (uint64_t h : hashes) all = ref::mix_seed(all, h);
  std::printf("[ LlNet ] %dx%d: %d iterations, hash %016llx, %.1f s (software NIC: a correctness run, not timing)\n",
              shape.nodes, shape.per_node, iterations, static_cast<unsigned long long>(all), s);
}

// Capture dispatch + combine once; every replay gets new activations, routing and weights (same T per rank): the
// kernels read their tags from device memory and their counts from the plan, so a replay is a new call.
TEST_P(LlNet, GraphReplayWithNewDataAndRouting) {
  const Shape shape = GetParam();
  NetEnv env(shape);
  const int n = shape.ranks();
  Barrier barrier(n);
  run([&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult res;
    rk.allocResult(res);
    auto problem = [&](int replay) {
      Problem pb = testProblem(n, 7700 + replay);
      pb.fp8 = true;
      pb.format = ref::ScaleFormat::kUe8m0;
      pb.topk = 6;
      pb.masked = 0.1;
      pb.tokens_per_rank.assign(n, ll_test::kTestTokens);
      pb.tokens_per_rank[n - 1] = 7;
      pb.weights = 1;  // weights through the dispatch headers (the captured combine is given none)
      return pb;
    };
    const Expected first = makeExpected(problem(0));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaSuccess, cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    rk.dispatch(first, res, ncclMoePhaseBoth);
    rk.combine(first, res, ncclMoePhaseBoth, false);
    ASSERT_EQ(cudaSuccess, cudaStreamEndCapture(stream, &graph));
    ASSERT_EQ(cudaSuccess, cudaGraphInstantiate(&exec, graph, 0));
    barrier.wait();
    for (int replay = 0; replay < 12; ++replay) {
      const Expected ex = makeExpected(problem(replay));
      rk.uploadInputs(ex, res);
      rk.uploadExpertOutputs(ex, res, false);
      ASSERT_EQ(cudaSuccess, cudaGraphLaunch(exec, stream));
      rk.checkDispatch(ex, res, "replay " + std::to_string(replay));
      rk.checkCombine(ex, res, "replay " + std::to_string(replay));
      if (::testing::Test::HasFailure()) break;
    }
    barrier.wait();  // nothing that may wait for the device while a peer's replay still runs
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    const Expected ex = makeExpected(problem(99));  // eager calls after the replays (the other half)
    rk.uploadInputs(ex, res);
    rk.dispatch(ex, res, ncclMoePhaseBoth);
    rk.checkDispatch(ex, res, "eager after graph");
    rk.uploadExpertOutputs(ex, res, false);
    rk.combine(ex, res, ncclMoePhaseBoth, false);
    rk.checkCombine(ex, res, "eager after graph");
    barrier.wait();
    rk.freeResult(res);
  });
}

TEST_P(LlNet, SkippedCallTimesOutNamingPhaseAndPeer) {
  const Shape shape = GetParam();
  NetEnv env(shape, nullptr);
  harness::ScopedEnv timeout("NCCL_MOE_TIMEOUT_S", "2");
  const int n = shape.ranks();
  const int skipper = n - 1;
  Barrier barrier(n);
  run([&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    Rank rk;
    rk.init(r, comm, stream, testConfig(n));
    RankResult res;
    rk.allocResult(res);
    const Problem pb = testProblem(n, 9200);
    const Expected ex = makeExpected(pb);
    rk.uploadInputs(ex, res);
    barrier.wait();
    if (r != skipper) {
      const auto t0 = std::chrono::steady_clock::now();
      rk.dispatch(ex, res, ncclMoePhaseBoth);
      const cudaError_t sync = cudaStreamSynchronize(stream);
      EXPECT_EQ(cudaSuccess, sync) << "a device timeout is reported by the library, not by a fault";
      // The failure surfaces at the next call on the communicator (or a query): the message names phase and peer.
      ncclMoeLLCombineArgs_t a = rk.combineArgs(ex, res, ncclMoePhaseBoth, false);
      const ncclResult_t next = ncclMoeLowLatencyCombine(comm, res.handle, &a, stream);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_NE(ncclSuccess, next) << "rank " << r;
      const std::string msg = ncclMoeGetLastError(comm);
      EXPECT_NE(std::string::npos, msg.find("ll-dispatch")) << "rank " << r << ": " << msg;
      EXPECT_NE(std::string::npos, msg.find("peer " + std::to_string(skipper))) << "rank " << r << ": " << msg;
      if (r / shape.per_node != skipper / shape.per_node)
        EXPECT_NE(std::string::npos, msg.find("QP")) << "rank " << r << " (another node than the skipper): " << msg;
      EXPECT_LT(s, 15.0) << "rank " << r;
    }
    barrier.wait();
    cudaStreamSynchronize(stream);
    rk.freeResult(res);
  });
}

INSTANTIATE_TEST_SUITE_P(Shapes, LlNet, ::testing::ValuesIn(net_test::shapes()), shapeName);

}  // namespace
