// High-throughput dispatch / combine on real GPUs against the CPU reference, bitwise.
//
// Every case runs with R = 2, 4 and 8 ranks (threads), one per GPU when the machine has R GPUs, else all on one GPU
// (tests/gpu/gpu_world.h): notify, dispatch, cached re-dispatch of new data with the same handle, combine (with
// 0/1/2 biases, with or without weights), and compares each output field with ref::ht_dispatch / ref::ht_combine. The
// mode space enumerated below covers dtype x fp8 scale format x scale strides x index type x K x masked slots x expert
// alignment x worst-case capacity x zero-token ranks x skew x odd hidden sizes. Separate tests: CUDA-graph capture and
// replay with new routing, a few hundred random back-to-back calls, capacity overflow, a peer that never
// arrives (timeout), layout and the fp8 cast helper.
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <memory>
#include <sstream>

#include "core/comm.h"
#include "ht_case.h"
#include "reference/testing/generators.h"

namespace ht_test {
namespace {

// The whole flow of one case on one rank. Non-fatal checks, so every rank reaches the collective destroy.
void runRank(const HtCase& c, const Expected& e, World& world, int rank, ncclMoeComm_t comm, cudaStream_t stream) {
  const int R = world.size();
  RankSession session(world, rank, comm, stream);
  const ref::RankRouting& rr = e.routing.ranks[rank];
  const int T = rr.num_tokens, K = c.topk, H = c.hidden;
  const DeviceBytes idx = uploadIds(c, rr);
  int num_recv = -1;
  std::vector<int> per_expert;
  ncclMoeNotifyArgs_t na = notifyArgs(c, e.capacity, R, idx, T, &num_recv, &per_expert);
  session.call("notify", [&] { return ncclMoeDispatchNotify(comm, session.handle(), &na, stream); });
  if (session.ok()) checkNotifyCounts(c, e.d1.recv[rank], session.handle(), num_recv, per_expert, rank);
  const int rows = c.worst_case ? R * e.capacity : (num_recv > 0 ? num_recv : 0);

  // Dispatch, then a cached re-dispatch of new data with the same handle.
  // (Every rank runs every step, so the steps' barriers match: a failed session only skips its calls.)
  DispatchInputs in[2];
  DispatchOutputs out[2];
  for (int pass = 0; pass < 2; ++pass) {
    const char* what = pass == 0 ? "dispatch" : "cached dispatch";
    uploadInputs(pass == 0 ? e.x1[rank] : e.x2[rank], rr, c.scale_layout, &in[pass]);
    out[pass].allocate(rows, H, K, c.dtype == ref::DType::kFp8E4M3, c.idx64, scaleWords(c));
    const ncclMoeDispatchArgs_t da = dispatchArgs(c, in[pass], out[pass]);
    session.call(what, [&] { return ncclMoeDispatch(comm, session.handle(), &da, stream); });
    if (session.ok()) checkDispatch(c, pass == 0 ? e.d1.recv[rank] : e.d2.recv[rank], out[pass], rank, what);
  }

  // Combine of the expert outputs y (in dispatch order).
  CombineCall cc(c, e, rank, rows);
  session.call("combine", [&] { return ncclMoeCombine(comm, session.handle(), &cc.args, stream); });
  if (session.ok()) cc.check(c, e, rank);
}

std::vector<HtCase> allCases() {
  std::vector<HtCase> v;
  auto add = [&](const char* name, std::function<void(HtCase&)> f) {
    HtCase c;
    c.name = name;
    c.seed = v.size() + 1;
    f(c);
    v.push_back(c);
  };
  using D = ref::DType;
  using F = ref::ScaleFormat;
  add("Bf16", [](HtCase&) {});
  add("Bf16Int32Align128Bias1", [](HtCase& c) {
    c.idx64 = false;
    c.alignment = 128;
    c.biases = 1;
  });
  add("Fp8Float", [](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.biases = 2;
  });
  add("Fp8FloatPaddedStride", [](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.scale_layout = 1;
  });
  add("Fp8FloatColumnMajor", [](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.scale_layout = 2;
    c.combine_weights = false;
  });
  add("Fp8Ue8m0", [](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.format = F::kUe8m0;
  });
  add("Fp8Ue8m0ColumnMajorOddHidden", [](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.format = F::kUe8m0;
    c.scale_layout = 2;
    c.hidden = 2064;
  });
  add("Top1", [](HtCase& c) {
    c.topk = 1;
    c.biases = 2;
  });
  add("Top16Masked", [](HtCase& c) {
    c.topk = 16;
    c.masked = 0.3;
    c.num_experts = 128;
  });
  add("Top3MaskedEmptyAlign128", [](HtCase& c) {
    c.topk = 3;
    c.masked = 0.2;
    c.empty = 0.2;
    c.alignment = 128;
    c.idx64 = false;
  });
  add("ZeroTokenRank", [](HtCase& c) {
    c.zero_ranks = 1;
    c.biases = 1;
  });
  add("Skewed", [](HtCase& c) {
    c.skew = 4.0;
    c.tokens = 700;
  });
  add("Hidden136", [](HtCase& c) {
    c.hidden = 136;
    c.biases = 2;
  });
  add("Hidden2064Fp8", [](HtCase& c) {
    c.hidden = 2064;
    c.dtype = D::kFp8E4M3;
  });  // fp8 needs H % 16
  add("Hidden2056", [](HtCase& c) { c.hidden = 2056; });
  add("NoWeights", [](HtCase& c) {
    c.weights = false;
    c.combine_weights = false;
  });
  add("WorstCaseBf16", [](HtCase& c) {
    c.worst_case = true;
    c.biases = 2;
  });
  add("WorstCaseFp8Ue8m0Int32", [](HtCase& c) {
    c.worst_case = true;
    c.dtype = D::kFp8E4M3;
    c.format = F::kUe8m0;
    c.idx64 = false;
  });
  add("OneSm", [](HtCase& c) {
    c.num_sms = 1;
    c.tokens = 64;
  });
  add("ManySmsFewTokens", [](HtCase& c) {
    c.num_sms = 64;
    c.tokens = 7;
  });
  add("LargeTokens", [](HtCase& c) {
    c.tokens = 4096;
    c.hidden = 512;
    c.topk = 8;
    c.num_experts = 256;
  });
  add("BlockSplitFp8", [](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.num_sms = 6;
    c.tuning.dispatch_send_blocks = 2;
    c.tuning.combine_send_blocks = 4;
    c.biases = 2;
  });
  add("BlockSplitBf16Skewed", [](HtCase& c) {
    c.num_sms = 5;
    c.skew = 3.0;
    c.tuning.dispatch_send_blocks = 3;
    c.tuning.combine_send_blocks = 1;
  });
  add("WarpSplit4And28", [](HtCase& c) {
    c.num_sms = 3;
    c.tuning.dispatch_send_warps = 4;
    c.tuning.combine_send_warps = 28;
  });
  return v;
}

class HtDispatchCombine : public ::testing::TestWithParam<std::tuple<HtCase, int>> {};

TEST_P(HtDispatchCombine, MatchesReference) {
  const int n = std::get<1>(GetParam());
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  HtCase c = std::get<0>(GetParam());
  c.num_sms = world.clampSms(c.num_sms);
  const Expected e = makeExpected(c, n);
  nccl_moe::htTuning() = c.tuning;
  world.runWithComms(caseConfig(c, e.capacity),
                     [&](int r, ncclMoeComm_t comm, cudaStream_t stream) { runRank(c, e, world, r, comm, stream); });
  nccl_moe::htTuning() = nccl_moe::HtTuning{};
}

INSTANTIATE_TEST_SUITE_P(Ht, HtDispatchCombine,
                         ::testing::Combine(::testing::ValuesIn(allCases()),
                                            ::testing::ValuesIn(gpu_test::rankCounts())),
                         [](const ::testing::TestParamInfo<std::tuple<HtCase, int>>& info) {
                           return std::get<0>(info.param).name + "_R" + std::to_string(std::get<1>(info.param));
                         });

// ------------------------------------------------------------------------------------------------
// CUDA graph: notify (worst-case mode) + dispatch + combine captured once, replayed with new routing and data
// written into the same device buffers.
// ------------------------------------------------------------------------------------------------

class HtGraph : public ::testing::TestWithParam<int> {};

TEST_P(HtGraph, NotifyDispatchCombineReplayWithNewRouting) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  const int E = 64, K = 8, T = 256, H = 1024, kReplays = 6;
  struct Replay {
    ref::Routing routing;
    std::vector<ref::Rows> x;
    ref::HtDispatch d;
    ref::HtCombineResult c;
  };
  std::vector<Replay> replays(kReplays);
  for (int i = 0; i < kReplays; ++i) {
    ref::RoutingSpec spec;
    spec.num_ranks = n;
    spec.num_experts = E;
    spec.topk = K;
    spec.num_tokens = T;
    spec.masked_fraction = i % 2 ? 0.25 : 0.0;
    spec.skew = i == 3 ? 3.0 : 1.0;
    spec.seed = 1000 + i;
    Replay& r = replays[i];
    r.routing = ref::make_routing(spec);
    r.x = makeRows(r.routing, 2000 + i, H, ref::DType::kBf16, ref::ScaleFormat::kFloat);
    r.d = ref::ht_dispatch(r.routing, 1, &r.x);
    std::vector<std::vector<uint16_t>> y(n);
    std::vector<std::vector<float>> w(n);
    for (int d = 0; d < n; ++d) {
      y[d] = r.d.recv[d].x.bf16;
      w[d] = r.d.recv[d].topk_weights;
    }
    r.c = ref::ht_combine(r.d, y, H, &w);
  }
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = E;
  config.hidden = H;
  config.max_topk = K;
  config.max_tokens_per_rank = T;
  world.runWithComms(config, [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    ncclMoeHandle_t handle = nullptr;
    EXPECT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle));
    const int cap = n * T;
    DeviceBytes idx(static_cast<size_t>(T) * K * 8), wts(static_cast<size_t>(T) * K * 4),
        x(static_cast<size_t>(T) * H * 2);
    DeviceBytes rx(static_cast<size_t>(cap) * H * 2), ridx(static_cast<size_t>(cap) * K * 8),
        rw(static_cast<size_t>(cap) * K * 4);
    DeviceBytes out(static_cast<size_t>(T) * H * 2), out_w(static_cast<size_t>(T) * K * 4);
    ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
    na.topk_idx = idx.get();
    na.num_tokens = T;
    na.topk = K;
    na.recv_capacity = cap;
    ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
    da.x = x.get();
    da.hidden = H;
    da.topk_weights = wts.as<float>();
    da.recv_x = rx.get();
    da.recv_topk_idx = ridx.get();
    da.recv_topk_weights = rw.as<float>();
    ncclMoeCombineArgs_t ca = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
    ca.x = rx.get();
    ca.hidden = H;
    ca.topk_weights = rw.as<float>();
    ca.combined_topk_weights = out_w.as<float>();
    ca.combined_x = out.get();
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    bool ok = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
    if (ok) {
      EXPECT_EQ(ncclSuccess, ncclMoeDispatchNotify(comm, handle, &na, stream)) << ncclMoeGetLastError(comm);
      EXPECT_EQ(ncclSuccess, ncclMoeDispatch(comm, handle, &da, stream)) << ncclMoeGetLastError(comm);
      EXPECT_EQ(ncclSuccess, ncclMoeCombine(comm, handle, &ca, stream)) << ncclMoeGetLastError(comm);
      ok = cudaStreamEndCapture(stream, &graph) == cudaSuccess && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    }
    EXPECT_TRUE(ok) << "capture failed: " << cudaGetErrorString(cudaGetLastError());
    const int* d_count = nullptr;
    ncclMoeHandleRecvCountDevice(handle, &d_count, nullptr, nullptr);
    for (int i = 0; i < kReplays; ++i) {
      const Replay& r = replays[i];
      idx.uploadBytes(r.routing.ranks[rank].topk_idx);
      wts.uploadBytes(r.routing.ranks[rank].topk_weights);
      x.uploadBytes(r.x[rank].bf16);
      world.barrier().wait();  // every rank's inputs are in place before any replay starts (and ranks stay in step)
      if (!ok) continue;
      // Launch twice on the last replay: back-to-back replays must not disturb each other.
      const int launches = i == kReplays - 1 ? 2 : 1;
      for (int l = 0; l < launches; ++l) EXPECT_EQ(cudaSuccess, cudaGraphLaunch(exec, stream));
      EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
      ncclResult_t async = ncclSuccess;
      ncclMoeCommGetAsyncError(comm, &async);
      if (async != ncclSuccess) {
        ADD_FAILURE() << "rank " << rank << " replay " << i << ": " << ncclMoeGetLastError(comm);
        ok = false;
        continue;
      }
      const ref::HtRankRecv& want = r.d.recv[rank];
      int count = -1;
      cudaMemcpy(&count, d_count, 4, cudaMemcpyDeviceToHost);
      EXPECT_EQ(want.num_recv, count) << "replay " << i;
      HtCase c;
      c.topk = K;
      c.hidden = H;
      c.worst_case = true;
      DispatchOutputs view;  // wrap the graph's outputs for checkDispatch (no copies)
      view.rows = cap;
      view.x = std::move(rx);
      view.idx = std::move(ridx);
      view.weights = std::move(rw);
      checkDispatch(c, want, view, rank, ("replay " + std::to_string(i)).c_str());
      rx = std::move(view.x);
      ridx = std::move(view.idx);
      rw = std::move(view.weights);
      auto got = out.download<uint16_t>(static_cast<size_t>(T) * H);
      EXPECT_EQ(-1, firstDiff(got.data(), r.c.x[rank].data(), got.size())) << "replay " << i << " combine";
      auto gw = out_w.download<float>(static_cast<size_t>(T) * K);
      EXPECT_EQ(-1, firstDiff(gw.data(), r.c.topk_weights[rank].data(), gw.size())) << "replay " << i << " weights";
    }
    world.barrier().wait();
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
    ncclMoeHandleDestroy(handle);
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, HtGraph, ::testing::ValuesIn(gpu_test::rankCounts()), gpu_test::ranksName);

// ------------------------------------------------------------------------------------------------
// Two thousand random calls on one communicator: every call enqueued back to back (notify, dispatch,
// cached re-dispatch, combine) and checked after one synchronisation.
// ------------------------------------------------------------------------------------------------

class HtStress : public ::testing::TestWithParam<int> {};

TEST_P(HtStress, RandomBackToBackCalls) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  const RandomLimits lim;  // E = 32, H <= 256, K <= 8, 96 tokens
  // NCCL_MOE_TEST_STRESS_ITERS: fewer iterations (diagnostics); NCCL_MOE_TEST_STRESS_STEP=1: a barrier and a stream
  // synchronisation between the calls of an iteration instead of enqueuing them back to back.
  const char* iters_env = std::getenv("NCCL_MOE_TEST_STRESS_ITERS");
  const int kIters = iters_env != nullptr ? std::atoi(iters_env) : 2000;
  const bool step = std::getenv("NCCL_MOE_TEST_STRESS_STEP") != nullptr;
  struct Iter {
    HtCase c;
    Expected e;
  };
  std::vector<Iter> iters(kIters);
  ref::Rng rng(4242);
  for (int i = 0; i < kIters; ++i) {
    iters[i].c = randomCase(rng, i, 10000 + i, lim, world);
    iters[i].e = randomExpected(iters[i].c, n, lim);
  }
  world.runWithComms(randomConfig(lim), [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    ncclMoeHandle_t handle = nullptr;
    EXPECT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle));
    bool ok = true;
    // Every rank runs every iteration (a barrier each: no rank allocates or frees while a peer's calls wait for
    // it); a failed rank only skips its calls.
    for (int i = 0; i < kIters; ++i) {
      // Everything the iteration needs, allocated before the barrier and freed after the one that follows.
      RandomIteration it(iters[i].c, iters[i].e, rank, n, static_cast<int>(i % 3));
      world.barrier().wait();
      if (ok) ok = it.run(world, comm, handle, stream, step, "iter " + std::to_string(i));
      world.barrier().wait();
    }
    world.barrier().wait();
    ncclMoeHandleDestroy(handle);
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, HtStress, ::testing::ValuesIn(gpu_test::rankCounts()), gpu_test::ranksName);

// ------------------------------------------------------------------------------------------------
// Errors recorded on the device
// ------------------------------------------------------------------------------------------------

class HtErrors : public ::testing::TestWithParam<int> {};

TEST_P(HtErrors, CapacityOverflowIsReportedAndNothingPastCapacityIsWritten) {
  Placement placement;
  GPU_WORLD_OR_SKIP(GetParam(), &placement);
  checkCapacityOverflow(GetParam(), placement);
}

TEST_P(HtErrors, MissingPeerTimesOutWithPhaseRankAndPeer) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  const char* old = std::getenv("NCCL_MOE_TIMEOUT_S");
  const std::string saved = old != nullptr ? old : "";
  setenv("NCCL_MOE_TIMEOUT_S", "2", 1);
  HtCase c;
  c.tokens = 32;
  c.num_experts = 16;
  c.topk = 2;
  c.hidden = 128;
  const Expected e = makeExpected(c, n);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  world.runWithComms(caseConfig(c, c.tokens), [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    world.barrier().wait();
    if (rank == 0) {  // every comm has read the variable: restore it for the tests that follow
      if (saved.empty())
        unsetenv("NCCL_MOE_TIMEOUT_S");
      else
        setenv("NCCL_MOE_TIMEOUT_S", saved.c_str(), 1);
    }
    ncclMoeHandle_t handle = nullptr;
    EXPECT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle));
    const ref::RankRouting& rr = e.routing.ranks[rank];
    DeviceBytes idx(rr.topk_idx.size() * 8 + 16), x(static_cast<size_t>(rr.num_tokens) * c.hidden * 2 + 16);
    idx.uploadBytes(rr.topk_idx);
    x.uploadBytes(e.x1[rank].bf16);
    ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
    na.topk_idx = idx.get();
    na.num_tokens = rr.num_tokens;
    na.topk = c.topk;
    int num_recv = 0;
    na.num_recv_tokens = &num_recv;
    world.barrier().wait();
    EXPECT_EQ(ncclSuccess, ncclMoeDispatchNotify(comm, handle, &na, stream)) << ncclMoeGetLastError(comm);
    DeviceBytes rx(static_cast<size_t>(num_recv + 1) * c.hidden * 2);
    world.barrier().wait();
    if (rank == 0) {  // rank 0 dispatches; the other ranks skip this dispatch
      ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
      da.x = x.get();
      da.hidden = c.hidden;
      da.recv_x = rx.get();
      const auto start = std::chrono::steady_clock::now();
      EXPECT_EQ(ncclSuccess, ncclMoeDispatch(comm, handle, &da, stream)) << ncclMoeGetLastError(comm);
      EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream));
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_LT(seconds, 20.0);
      ncclResult_t async = ncclSuccess;
      EXPECT_EQ(ncclSuccess, ncclMoeCommGetAsyncError(comm, &async));
      EXPECT_EQ(ncclRemoteError, async);
      const std::string msg = ncclMoeGetLastError(comm);
      EXPECT_NE(std::string::npos, msg.find("ht-dispatch")) << msg;
      EXPECT_NE(std::string::npos, msg.find("rank 0")) << msg;
      // The first peer whose wait expired: any of the others (they all skipped the dispatch).
      bool names_peer = false;
      for (int p = 1; p < n; ++p) names_peer = names_peer || msg.find("peer " + std::to_string(p)) != std::string::npos;
      EXPECT_TRUE(names_peer) << msg;
      // Every later call on the communicator reports the failure.
      EXPECT_NE(ncclSuccess, ncclMoeDispatch(comm, handle, &da, stream));
    }
    world.barrier().wait();
    ncclMoeHandleDestroy(handle);
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, HtErrors, ::testing::ValuesIn(gpu_test::rankCounts()), gpu_test::ranksName);

}  // namespace
}  // namespace ht_test
