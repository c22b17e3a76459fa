// Internode high-throughput dispatch/combine (issue 14, docs/kernels-ht-internode.md) on virtual nodes: all ranks are
// threads of this process on GPU 0 (ncclMoeCommInitAll), split into nodes by NCCL_MOE_EMULATE_NODES, with the
// software NIC as the scale-out transport (NCCL_MOE_NET=emulated) and its chaos mode on (net_world.h). Every output
// is compared bit for bit with the CPU reference through the checks the intranode HT tests use (ht_case.h): the
// dispatch with ref::ht_dispatch (rows by source rank, then source token; data, fp8 scales, local ids, weights,
// counts), the combine with ref::ht_combine_nodes over NodeMap::consecutive(R, ranks per node) (the two-level sum:
// one bf16 partial per node), not with the flat ref::ht_combine.
//
//   Shapes/HtNet.MatchesReferenceSweep        bf16, fp8 with float and packed UE8M0 scales (packed, padded and
//                                             column-major scale strides), int32/int64 ids, K 1..16 with masked
//                                             slots and empty tokens, T drawn from 0..capacity per rank (zero-token
//                                             and full ranks), uniform, skewed and group-limited routing, expert
//                                             alignment, host-count and worst-case modes (recv_capacity differing
//                                             between ranks, down to exactly N_recv), a cached re-dispatch of new data
//                                             after every dispatch, combine with/without weights and 0/1/2 biases;
//                                             H 136..1152 and 7168 once; one handle reused for every problem
//   Shapes/HtNet.GraphReplayWithNewRouting    worst-case notify + dispatch + combine captured once per rank, replayed
//                                             6 times (twice back to back on the last) with new routing, data and
//                                             biases written into the same buffers; every replay checked
//   Shapes/HtNet.RandomIterationsHash         random problems back to back (NCCL_MOE_NET_TEST_ITERATIONS, default 20),
//                                             each notify, dispatch, cached re-dispatch and combine; prints an FNV-1a
//                                             hash of every compared byte (reproducible from the fixed seeds)
//   Shapes/HtNet.SkippedCallTimesOutNamingPhaseAndPeer
//                                             the last rank skips a dispatch after a common notify: every other rank
//                                             fails within NCCL_MOE_TIMEOUT_S=2 with an "ht-net-*" message naming the
//                                             skipper or the forwarder of its rows (and the QP across nodes)
//   Shapes/HtNet.CapacityOverflowIsAnError    worst-case capacity below N_recv on a rank of the first and of the last
//                                             node: ncclInvalidUsage naming the capacity, nothing written past it;
//                                             the other ranks' results exact
// Shapes: 2x1, 2x2, 4x1, 2x4 (nodes x ranks per node), each in ibgda mode and in proxy mode ("2x2_proxy":
// NCCL_MOE_NET_MODE=proxy, the request proxy posts for the kernels), plus 2x2_pure and 2x4_pure
// (NCCL_MOE_NET_PURE_RDMA=1: the LL kernels reach same-node ranks through the NIC too; tests/gpu/net_world.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "ht_case.h"
#include "net_world.h"
#include "reference/reference.h"
#include "reference/testing/compare.h"
#include "reference/testing/generators.h"

namespace ht_test {
namespace {

using net_test::NetEnv;
using net_test::Shape;

// The communicator of every test but the random one: E = 64 (8 local experts at 2x4, 16 experts per node at 4x1, so
// group-limited routing to one node allows K = 16), K up to 16, H up to 7168, 48 tokens per rank.
constexpr int kExperts = 64, kMaxTopk = 16, kMaxHidden = 7168, kCapacity = 48;

ncclMoeConfig_t netConfig() {
  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = kExperts;
  config.hidden = kMaxHidden;
  config.max_topk = kMaxTopk;
  config.max_tokens_per_rank = kCapacity;
  return config;
}

// One line naming everything a case varies, for failure messages.
std::string describe(const HtCase& c) {
  std::string s = c.name + " [seed " + std::to_string(c.seed) + ", H " + std::to_string(c.hidden) + ", K " +
                  std::to_string(c.topk) + ", ";
  s += c.dtype == ref::DType::kBf16 ? "bf16" : c.format == ref::ScaleFormat::kUe8m0 ? "fp8/ue8m0" : "fp8/float";
  if (c.dtype == ref::DType::kFp8E4M3) s += c.scale_layout == 0 ? " packed" : c.scale_layout == 1 ? " padded" : " cols";
  s += c.idx64 ? ", int64 ids" : ", int32 ids";
  s += c.worst_case ? ", worst-case" : ", host-count";
  s += ", T";
  if (c.tokens_per_rank.empty()) {
    s += " " + std::to_string(c.tokens) + " everywhere";
  } else {
    for (int t : c.tokens_per_rank) s += " " + std::to_string(t);
  }
  if (c.zero_ranks > 0) s += ", last " + std::to_string(c.zero_ranks) + " rank(s) empty";
  if (c.group_nodes > 0) s += ", group-limited to " + std::to_string(c.group_nodes) + " node(s)";
  char fractions[96];
  std::snprintf(fractions, sizeof(fractions), ", skew %.1f, masked %.2f, empty %.2f", c.skew, c.masked, c.empty);
  s += fractions;
  if (c.alignment > 1) s += ", align " + std::to_string(c.alignment);
  s += c.weights ? ", weights" : ", no weights";
  s += c.combine_weights ? ", combine weights" : "";
  s += ", " + std::to_string(c.biases) + " bias(es), num_sms " + std::to_string(c.num_sms) + "]";
  return s;
}

// Called by every rank after a step: true on every rank when any rank failed, so that all ranks stop together
// (none keeps calling while a peer has stopped, which would only end in device timeouts).
bool anyRankFailed(World& world) {
  world.barrier().wait();
  const bool failed = ::testing::Test::HasFailure();
  world.barrier().wait();
  return failed;
}

// Worst-case mode: the recv_capacity of `rank` in the sweep. It may differ between ranks: R x capacity (the largest
// accepted), N_recv + 3, or exactly N_recv (at least 1: 0 would be host-count mode).
int sweepRecvCapacity(const Expected& e, int rank, int num_ranks) {
  const int n = e.d1.recv[rank].num_recv, largest = num_ranks * e.capacity;
  switch (rank % 3) {
    case 0:
      return largest;
    case 1:
      return std::min(n + 3, largest);
    default:
      return std::max(n, 1);
  }
}

class HtNet : public ::testing::TestWithParam<Shape> {
 protected:
  void SetUp() override {
    const std::string why = net_test::cannotRun(GetParam());
    if (!why.empty()) GTEST_SKIP() << why;
  }
  int ranks() const { return GetParam().ranks(); }
  // The node map of the virtual-node world: rank r on node r / ranks per node (NCCL_MOE_EMULATE_NODES).
  ref::NodeMap nodes() const { return ref::NodeMap::consecutive(GetParam().ranks(), GetParam().per_node); }
};

// ------------------------------------------------------------------------------------------------
// MatchesReferenceSweep
// ------------------------------------------------------------------------------------------------

std::vector<HtCase> sweepCases(const Shape& shape) {
  const int R = shape.ranks();
  std::vector<HtCase> v;
  auto add = [&](const char* name, auto setup) {
    HtCase c;
    c.name = name;
    c.seed = 5001 + v.size();
    c.num_experts = kExperts;
    c.tokens = kCapacity;
    c.hidden = 256;
    c.topk = 8;
    // T of every rank drawn independently from 0..capacity (cases below may override it).
    ref::Rng rng(ref::mix_seed(c.seed, 77));
    for (int r = 0; r < R; ++r) c.tokens_per_rank.push_back(static_cast<int>(rng.below(kCapacity + 1)));
    setup(c);
    v.push_back(c);
  };
  // Group-limited routing: every token's experts on at most `groups` nodes (DeepSeek-V3's node-limited gating).
  auto grouped = [&](HtCase& c, int groups) {
    c.group_nodes = std::min(groups, shape.nodes);
    c.ranks_per_node = shape.per_node;
  };
  using D = ref::DType;
  using F = ref::ScaleFormat;
  add("Bf16Uniform", [](HtCase&) {});
  add("Bf16GroupLimitedWorstCaseInt32Bias2", [&](HtCase& c) {
    grouped(c, 1);
    c.worst_case = true;
    c.idx64 = false;
    c.biases = 2;
  });
  add("Fp8FloatH384Top4Masked", [](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.hidden = 384;
    c.topk = 4;
    c.masked = 0.3;
    c.biases = 1;
  });
  add("Fp8Ue8m0H640GroupLimitedWorstCase", [&](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.format = F::kUe8m0;
    c.hidden = 640;
    grouped(c, 1);
    c.worst_case = true;
    c.combine_weights = false;
  });
  add("Top1ZeroTokenRanksOnTwoNodes", [&](HtCase& c) {
    c.topk = 1;
    c.tokens_per_rank.front() = 0;
    c.tokens_per_rank.back() = 0;
    c.biases = 2;
  });
  add("Top16MaskedEmptyInt32Fp8Float", [](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.topk = 16;
    c.masked = 0.25;
    c.empty = 0.1;
    c.idx64 = false;
    c.biases = 2;
    c.combine_weights = false;
  });
  add("Bf16H7168", [](HtCase& c) {
    c.hidden = 7168;
    c.biases = 1;
  });
  add("Fp8Ue8m0H1152ColumnMajorScalesTop3Align128", [](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.format = F::kUe8m0;
    c.scale_layout = 2;
    c.hidden = 1152;  // 9 scale groups: the last packed word holds one byte
    c.topk = 3;
    c.alignment = 128;
  });
  add("Fp8FloatPaddedScalesGroupLimited2Top6WorstCase", [&](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.scale_layout = 1;
    grouped(c, 2);
    c.topk = 6;
    c.worst_case = true;
  });
  add("NoWeightsTop5WorstCaseBias1", [](HtCase& c) {
    c.weights = false;
    c.combine_weights = false;
    c.topk = 5;
    c.worst_case = true;
    c.biases = 1;
  });
  add("Bf16H136Top7MaskedAlign4", [](HtCase& c) {
    c.hidden = 136;
    c.topk = 7;
    c.masked = 0.2;
    c.alignment = 4;
  });
  add("SkewedTop6Int32", [](HtCase& c) {
    c.skew = 3.0;
    c.topk = 6;
    c.idx64 = false;
  });
  add("AllRanksEmpty", [](HtCase& c) {
    c.tokens_per_rank.assign(c.tokens_per_rank.size(), 0);
    c.biases = 2;
  });
  add("AllRanksFullFp8FloatH512WorstCase", [](HtCase& c) {
    c.tokens_per_rank.assign(c.tokens_per_rank.size(), kCapacity);
    c.dtype = D::kFp8E4M3;
    c.hidden = 512;
    c.worst_case = true;
    c.biases = 1;
  });
  add("Fp8Ue8m0Top16GroupLimitedInt32", [&](HtCase& c) {
    c.dtype = D::kFp8E4M3;
    c.format = F::kUe8m0;
    c.topk = 16;
    grouped(c, 1);
    c.masked = 0.1;
    c.idx64 = false;
    c.biases = 2;
  });
  add("Bf16Top2EmptyTokensWorstCaseNoCombineWeights", [](HtCase& c) {
    c.topk = 2;
    c.empty = 0.3;
    c.worst_case = true;
    c.combine_weights = false;
  });
  return v;
}

// One problem on one rank: notify, dispatch, cached re-dispatch of new data and combine, each call after a barrier
// and checked once complete (RankSession). Every device buffer is allocated before the first barrier and freed
// after the last one, so no rank allocates or frees while a peer's kernel may wait for it or for its NIC.
void runProblem(const HtCase& c, const Expected& e, World& world, RankSession& session, int rank) {
  SCOPED_TRACE(describe(c));
  const int R = world.size(), K = c.topk, H = c.hidden;
  const ref::RankRouting& rr = e.routing.ranks[rank];
  const ref::HtRankRecv& want = e.d1.recv[rank];
  const int max_rows = R * e.capacity;
  const bool fp8 = c.dtype == ref::DType::kFp8E4M3;
  const DeviceBytes idx = uploadIds(c, rr);
  DispatchInputs in[2];
  DispatchOutputs out[2];
  for (int pass = 0; pass < 2; ++pass) {
    uploadInputs(pass == 0 ? e.x1[rank] : e.x2[rank], rr, c.scale_layout, &in[pass]);
    out[pass].allocate(max_rows, H, K, fp8, c.idx64, scaleWords(c));
  }
  CombineCall cc(c, e, rank, max_rows);
  int num_recv = -1;
  std::vector<int> per_expert;
  ncclMoeNotifyArgs_t na = notifyArgs(c, e.capacity, R, idx, rr.num_tokens, &num_recv, &per_expert);
  if (c.worst_case) na.recv_capacity = sweepRecvCapacity(e, rank, R);

  ncclMoeComm_t comm = session.comm();
  cudaStream_t stream = session.stream();
  session.call("notify", [&] { return ncclMoeDispatchNotify(comm, session.handle(), &na, stream); });
  if (session.ok()) checkNotifyCounts(c, want, session.handle(), num_recv, per_expert, rank);
  for (int pass = 0; pass < 2; ++pass) {
    const char* what = pass == 0 ? "dispatch" : "cached dispatch";
    // Worst-case mode: rows up to the capacity must hold ids -1 / weights 0 past N_recv (checkDispatch).
    out[pass].rows = c.worst_case ? na.recv_capacity : std::max(num_recv, 0);
    const ncclMoeDispatchArgs_t da = dispatchArgs(c, in[pass], out[pass]);
    session.call(what, [&] { return ncclMoeDispatch(comm, session.handle(), &da, stream); });
    if (session.ok()) checkDispatch(c, pass == 0 ? want : e.d2.recv[rank], out[pass], rank, what);
  }
  session.call("combine", [&] { return ncclMoeCombine(comm, session.handle(), &cc.args, stream); });
  if (session.ok()) cc.check(c, e, rank);
  world.barrier().wait();  // every rank's calls are complete before any buffer is freed
}

// Rows of the sweep's combines where the two-level order gives other bits than the flat sum: with several ranks per
// node the sweep would catch a kernel that summed flat (printed, not checked: a property of the data).
int64_t twoLevelDiffers(const HtCase& c, const Expected& e) {
  const auto flat = ref::ht_combine(e.d1, e.y, c.hidden, c.combine_weights ? &e.yw : nullptr,
                                    c.biases >= 1 ? &e.b0 : nullptr, c.biases >= 2 ? &e.b1 : nullptr);
  int64_t rows = 0;
  for (size_t s = 0; s < flat.x.size(); ++s)
    for (size_t t = 0; t * c.hidden < flat.x[s].size(); ++t)
      rows += std::equal(flat.x[s].begin() + t * c.hidden, flat.x[s].begin() + (t + 1) * c.hidden,
                         e.c.x[s].begin() + t * c.hidden)
                  ? 0
                  : 1;
  return rows;
}

TEST_P(HtNet, MatchesReferenceSweep) {
  const Shape shape = GetParam();
  NetEnv env(shape);
  const int n = ranks();
  const ref::NodeMap map = nodes();
  const std::vector<HtCase> cases = sweepCases(shape);
  std::vector<Expected> expected;
  int64_t two_level_rows = 0;
  for (const HtCase& c : cases) {
    expected.push_back(makeExpected(c, n, &map));
    expected.back().capacity = kCapacity;
    two_level_rows += twoLevelDiffers(c, expected.back());
  }
  std::printf("[ HtNet ] %dx%d: %zu problems; the two-level combine differs from the flat sum on %lld rows\n",
              shape.nodes, shape.per_node, cases.size(), static_cast<long long>(two_level_rows));
  World world(n, Placement::kOneGpu);
  ASSERT_TRUE(world.ok());
  const auto t0 = std::chrono::steady_clock::now();
  world.runWithComms(netConfig(), [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    RankSession session(world, rank, comm, stream);  // one handle for every problem
    for (size_t i = 0; i < cases.size(); ++i) {
      runProblem(cases[i], expected[i], world, session, rank);
      if (anyRankFailed(world)) {
        if (rank == 0) ADD_FAILURE() << "stopped after problem " << i << ": " << describe(cases[i]);
        break;
      }
    }
    world.barrier().wait();  // the handle goes only after every rank's last call
  });
  std::printf("[ HtNet ] %dx%d sweep: %.1f s (software NIC: a correctness run, not timing)\n", shape.nodes,
              shape.per_node, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

// ------------------------------------------------------------------------------------------------
// GraphReplayWithNewRouting
// ------------------------------------------------------------------------------------------------

// Worst-case notify + dispatch (bf16, weights) + combine (the dispatched rows and weights back, plus bias0) captured
// once per rank; each replay writes new routing, activations, weights and bias into the captured input buffers.
// T is fixed per rank (captured), and differs between ranks.
TEST_P(HtNet, GraphReplayWithNewRouting) {
  const Shape shape = GetParam();
  NetEnv env(shape);
  const int n = ranks();
  const ref::NodeMap map = nodes();
  constexpr int K = 8, H = 384, kReplays = 6;
  std::vector<int> tokens(n, kCapacity);
  tokens[n - 1] = 13;
  struct Replay {
    ref::Routing routing;
    std::vector<ref::Rows> x;
    std::vector<std::vector<uint16_t>> bias;
    ref::HtDispatch d;
    ref::HtCombineResult c;
  };
  std::vector<Replay> replays(kReplays);
  for (int i = 0; i < kReplays; ++i) {
    ref::RoutingSpec spec;
    spec.num_ranks = n;
    spec.num_experts = kExperts;
    spec.topk = K;
    spec.tokens_per_rank = tokens;
    spec.masked_fraction = i % 2 ? 0.25 : 0.0;
    if (i % 3 == 1) {
      spec.group_nodes = 1;
      spec.ranks_per_node = shape.per_node;
    }
    spec.seed = 3000 + i;
    Replay& r = replays[i];
    r.routing = ref::make_routing(spec);
    r.x = makeRows(r.routing, 3100 + i, H, ref::DType::kBf16, ref::ScaleFormat::kFloat);
    r.bias = ref::make_bf16_rows_all(r.routing, 3200 + i, H, ref::ValueKind::kWide);
    r.d = ref::ht_dispatch(r.routing, 1, &r.x);
    std::vector<std::vector<uint16_t>> y(n);
    std::vector<std::vector<float>> w(n);
    for (int d = 0; d < n; ++d) {
      y[d] = r.d.recv[d].x.bf16;
      w[d] = r.d.recv[d].topk_weights;
    }
    r.c = ref::ht_combine_nodes(r.d, map, y, H, &w, &r.bias);
  }
  HtCase view;  // what checkDispatch needs to know of the captured dispatch
  view.name = "graph";
  view.topk = K;
  view.hidden = H;
  view.worst_case = true;
  World world(n, Placement::kOneGpu);
  ASSERT_TRUE(world.ok());
  world.runWithComms(netConfig(), [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    ncclMoeHandle_t handle = nullptr;
    EXPECT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle)) << ncclMoeGetLastError(comm);
    const int T = tokens[rank], cap = n * kCapacity;
    DeviceBytes idx(static_cast<size_t>(T) * K * 8 + 16), wts(static_cast<size_t>(T) * K * 4 + 16),
        x(static_cast<size_t>(T) * H * 2 + 16), bias(static_cast<size_t>(T) * H * 2 + 16),
        out(static_cast<size_t>(T) * H * 2 + 16), out_w(static_cast<size_t>(T) * K * 4 + 16);
    DispatchOutputs recv;
    recv.allocate(cap, H, K, false, true, 0);
    ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
    na.topk_idx = idx.get();
    na.num_tokens = T;
    na.topk = K;
    na.recv_capacity = cap;
    ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
    da.x = x.get();
    da.hidden = H;
    da.topk_weights = wts.as<float>();
    da.recv_x = recv.x.get();
    da.recv_topk_idx = recv.idx.get();
    da.recv_topk_weights = recv.weights.as<float>();
    ncclMoeCombineArgs_t ca = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
    ca.x = recv.x.get();
    ca.hidden = H;
    ca.topk_weights = recv.weights.as<float>();
    ca.bias_0 = bias.get();
    ca.combined_x = out.get();
    ca.combined_topk_weights = out_w.as<float>();
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    bool ok = handle != nullptr && cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
    if (ok) {
      EXPECT_EQ(ncclSuccess, ncclMoeDispatchNotify(comm, handle, &na, stream)) << ncclMoeGetLastError(comm);
      EXPECT_EQ(ncclSuccess, ncclMoeDispatch(comm, handle, &da, stream)) << ncclMoeGetLastError(comm);
      EXPECT_EQ(ncclSuccess, ncclMoeCombine(comm, handle, &ca, stream)) << ncclMoeGetLastError(comm);
      ok = cudaStreamEndCapture(stream, &graph) == cudaSuccess && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    }
    EXPECT_TRUE(ok) << "rank " << rank << " capture failed: " << cudaGetErrorString(cudaGetLastError());
    ok = !anyRankFailed(world);  // the same on every rank
    const int* d_count = nullptr;
    if (ok) ncclMoeHandleRecvCountDevice(handle, &d_count, nullptr, nullptr);
    for (int i = 0; i < kReplays && ok; ++i) {
      const std::string what = "replay " + std::to_string(i);
      SCOPED_TRACE(what);
      const Replay& r = replays[i];
      idx.uploadBytes(r.routing.ranks[rank].topk_idx);
      wts.uploadBytes(r.routing.ranks[rank].topk_weights);
      x.uploadBytes(r.x[rank].bf16);
      bias.uploadBytes(r.bias[rank]);
      world.barrier().wait();  // every rank's inputs are in place before any replay starts
      // Twice back to back on the last replay: consecutive replays must not disturb each other.
      const int launches = i == kReplays - 1 ? 2 : 1;
      for (int l = 0; l < launches; ++l) EXPECT_EQ(cudaSuccess, cudaGraphLaunch(exec, stream)) << "rank " << rank;
      EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream)) << "rank " << rank;
      ncclResult_t async = ncclSuccess;
      ncclMoeCommGetAsyncError(comm, &async);
      if (async != ncclSuccess) {
        ADD_FAILURE() << "rank " << rank << " " << what << ": " << ncclMoeGetLastError(comm);
      } else {
        const ref::HtRankRecv& want = r.d.recv[rank];
        int count = -1;
        cudaMemcpy(&count, d_count, 4, cudaMemcpyDeviceToHost);
        EXPECT_EQ(want.num_recv, count) << "rank " << rank << " device receive count";
        checkDispatch(view, want, recv, rank, what.c_str());
        auto got = out.download<uint16_t>(static_cast<size_t>(T) * H);
        const long long j = firstDiff(got.data(), r.c.x[rank].data(), got.size());
        EXPECT_EQ(-1, j) << "rank " << rank << " combine token " << (j < 0 ? -1 : j / H) << " channel "
                         << (j < 0 ? -1 : j % H) << tokenHolders(r.d, rank, j < 0 ? -1 : static_cast<int>(j / H));
        auto gw = out_w.download<float>(static_cast<size_t>(T) * K);
        const long long k = firstDiff(gw.data(), r.c.topk_weights[rank].data(), gw.size());
        EXPECT_EQ(-1, k) << "rank " << rank << " combined weights token " << (k < 0 ? -1 : k / K)
                         << tokenHolders(r.d, rank, k < 0 ? -1 : static_cast<int>(k / K));
      }
      ok = !anyRankFailed(world);  // the same on every rank
    }
    world.barrier().wait();  // nothing that may wait for the device while a peer's replay still runs
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (handle != nullptr) ncclMoeHandleDestroy(handle);
  });
}

// ------------------------------------------------------------------------------------------------
// RandomIterationsHash
// ------------------------------------------------------------------------------------------------

TEST_P(HtNet, RandomIterationsHash) {
  const Shape shape = GetParam();
  NetEnv env(shape);
  const int n = ranks();
  const ref::NodeMap map = nodes();
  const char* iters_env = std::getenv("NCCL_MOE_NET_TEST_ITERATIONS");
  const int iterations = iters_env != nullptr ? std::atoi(iters_env) : 20;
  RandomLimits lim;
  lim.num_experts = kExperts;
  lim.max_hidden = 512;
  lim.max_topk = kMaxTopk;
  lim.capacity = kCapacity;
  World world(n, Placement::kOneGpu);
  ASSERT_TRUE(world.ok());
  // Every problem drawn up front from one fixed seed: randomCase (dtype, format, K, H, ids, alignment, mode, masked
  // slots, skew, weights, biases, SMs, T, a zero-token rank), then T per rank and group-limited routing.
  struct Iter {
    HtCase c;
    Expected e;
  };
  std::vector<Iter> iters(iterations);
  ref::Rng rng(20261214);
  for (int i = 0; i < iterations; ++i) {
    HtCase c = randomCase(rng, i, 30000 + i, lim, world);
    c.scale_layout = i % 3;  // fp8 scales packed, padded, column-major
    if (rng.below(2) == 0) {
      c.tokens_per_rank.clear();
      for (int r = 0; r < n; ++r) c.tokens_per_rank.push_back(static_cast<int>(rng.below(lim.capacity + 1)));
    }
    if (c.skew == 1.0 && rng.below(3) == 0) {
      c.group_nodes = 1 + static_cast<int>(rng.below(shape.nodes));
      c.ranks_per_node = shape.per_node;
    }
    iters[i].c = c;
    iters[i].e = randomExpected(c, n, lim, &map);
  }
  std::vector<uint64_t> got(n, 0), want(n, 0);
  const auto t0 = std::chrono::steady_clock::now();
  world.runWithComms(randomConfig(lim), [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    ncclMoeHandle_t handle = nullptr;
    EXPECT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &handle)) << ncclMoeGetLastError(comm);
    uint64_t h = ref::kFnvOffset, h_ref = ref::kFnvOffset;
    bool ok = !anyRankFailed(world);  // the same on every rank
    for (int i = 0; ok && i < iterations; ++i) {
      SCOPED_TRACE(describe(iters[i].c));
      // Everything the iteration needs, allocated before the barrier and freed after the one that follows.
      RandomIteration it(iters[i].c, iters[i].e, rank, n, iters[i].c.scale_layout);
      world.barrier().wait();
      it.run(world, comm, handle, stream, false, "iteration " + std::to_string(i), &h);
      h_ref = it.expectedHash(h_ref);
      ok = !anyRankFailed(world);
    }
    got[rank] = h;
    want[rank] = h_ref;
    world.barrier().wait();
    if (handle != nullptr) ncclMoeHandleDestroy(handle);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Each rank's hash folds its compared bytes (dispatch, cached dispatch, combine of every iteration, in that order);
  // the printed hash folds the ranks' hashes in rank order.
  EXPECT_EQ(want, got) << "per-rank hashes of the compared outputs differ from the reference's";
  const uint64_t all = ref::fnv1a64(got);
  std::printf(
      "[ HtNet ] %dx%d: %d iterations, hash %016llx (reference %016llx), %.1f s (software NIC: a correctness "
      "run, not timing)\n",
      shape.nodes, shape.per_node, iterations, static_cast<unsigned long long>(all),
      static_cast<unsigned long long>(ref::fnv1a64(want)), seconds);
}

// ------------------------------------------------------------------------------------------------
// SkippedCallTimesOutNamingPhaseAndPeer
// ------------------------------------------------------------------------------------------------

// After a common notify the last rank skips a dispatch. A rank waiting for the skipper's rows fails within the
// timeout naming an ht-net phase and the peer it waited for (docs/kernels-ht-internode.md §7): the skipper itself
// (its rail peers and the ranks of its node), or the forwarder of the skipper's rows on its own node (the rank there
// with the skipper's local index), which never forwards them. A peer on another node comes with its QP.
TEST_P(HtNet, SkippedCallTimesOutNamingPhaseAndPeer) {
  const Shape shape = GetParam();
  NetEnv env(shape, nullptr);  // chaos off: the timing of the failure is the subject
  harness::ScopedEnv timeout("NCCL_MOE_TIMEOUT_S", "2");
  const int n = ranks(), skipper = n - 1;
  const ref::NodeMap map = nodes();
  HtCase c;
  c.name = "skip";
  c.num_experts = kExperts;
  c.topk = 8;
  c.tokens = 32;
  c.hidden = 256;
  c.seed = 9200;
  Expected e = makeExpected(c, n, &map);
  e.capacity = kCapacity;
  for (int r = 0; r < n; ++r) {
    const auto& prefix = e.d1.recv[r].rank_prefix;
    ASSERT_GT(prefix[skipper + 1] - prefix[skipper], 0) << "the routing must send rows of the skipper to rank " << r;
  }
  World world(n, Placement::kOneGpu);
  ASSERT_TRUE(world.ok());
  world.runWithComms(netConfig(), [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    RankSession session(world, rank, comm, stream);
    const ref::RankRouting& rr = e.routing.ranks[rank];
    const DeviceBytes idx = uploadIds(c, rr);
    DispatchInputs in;
    DispatchOutputs out;
    uploadInputs(e.x1[rank], rr, 0, &in);
    out.allocate(n * kCapacity, c.hidden, c.topk, false, c.idx64, 0);
    int num_recv = -1;
    std::vector<int> per_expert;
    const ncclMoeNotifyArgs_t na = notifyArgs(c, e.capacity, n, idx, rr.num_tokens, &num_recv, &per_expert);
    session.call("notify", [&] { return ncclMoeDispatchNotify(comm, session.handle(), &na, stream); });
    out.rows = std::max(num_recv, 0);
    const ncclMoeDispatchArgs_t da = dispatchArgs(c, in, out);
    const bool notified = !anyRankFailed(world);
    if (notified && rank != skipper) {
      const auto t0 = std::chrono::steady_clock::now();
      ncclResult_t res = ncclMoeDispatch(comm, session.handle(), &da, stream);
      if (res == ncclSuccess) {
        // The device wait's failure surfaces through the communicator: the stream itself completes.
        EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream))
            << "rank " << rank << ": a device timeout is reported by the library";
        ncclResult_t async = ncclSuccess;
        EXPECT_EQ(ncclSuccess, ncclMoeCommGetAsyncError(comm, &async));
        res = async;
      }
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const std::string msg = ncclMoeGetLastError(comm);
      EXPECT_EQ(ncclRemoteError, res) << "rank " << rank << ": " << msg;
      EXPECT_NE(std::string::npos, msg.find("ht-net-")) << "rank " << rank << ": " << msg;
      const int forwarder = (rank / shape.per_node) * shape.per_node + skipper % shape.per_node;
      int named = -1;
      for (int p : {skipper, forwarder})
        if (p != rank && msg.find("peer " + std::to_string(p)) != std::string::npos) named = p;
      EXPECT_NE(-1, named) << "rank " << rank << " should name peer " << skipper
                           << (forwarder != rank && forwarder != skipper
                                   ? " (the skipper) or peer " + std::to_string(forwarder) + " (its forwarder)"
                                   : std::string())
                           << ": " << msg;
      if (named >= 0 && named / shape.per_node != rank / shape.per_node)
        EXPECT_NE(std::string::npos, msg.find("QP")) << "rank " << rank << " (peer on another node): " << msg;
      EXPECT_LT(seconds, 20.0) << "rank " << rank;
      // Every later call on the communicator reports the failure.
      EXPECT_NE(ncclSuccess, ncclMoeDispatch(comm, session.handle(), &da, stream)) << "rank " << rank;
    }
    world.barrier().wait();
    cudaStreamSynchronize(stream);
    world.barrier().wait();  // no buffer is freed while a peer's kernel may still read it
  });
}

// ------------------------------------------------------------------------------------------------
// CapacityOverflowIsAnError
// ------------------------------------------------------------------------------------------------

// Worst-case mode with recv_capacity 5 rows short of N_recv on rank 0 and on the last rank (another node, when the
// world has more than two ranks); the other ranks pass exactly N_recv. The short ranks get ncclInvalidUsage naming
// their capacity (from the call or from the communicator after the stream), and no output row at or past the
// capacity is written (guard rows after it keep their fill); the others' results are exact.
TEST_P(HtNet, CapacityOverflowIsAnError) {
  const Shape shape = GetParam();
  NetEnv env(shape);
  const int n = ranks();
  const ref::NodeMap map = nodes();
  constexpr int kGuardRows = 8, kShort = 5;
  constexpr uint8_t kFill = 0x7b;
  HtCase c;
  c.name = "overflow";
  c.num_experts = kExperts;
  c.topk = 4;
  c.tokens = kCapacity;
  c.hidden = 256;
  c.worst_case = true;
  c.seed = 9300;
  Expected e = makeExpected(c, n, &map);
  e.capacity = kCapacity;
  auto overflows = [&](int r) { return r == 0 || (n > 2 && r == n - 1); };
  for (int r = 0; r < n; ++r)
    if (overflows(r)) ASSERT_GT(e.d1.recv[r].num_recv, kShort) << "rank " << r;
  World world(n, Placement::kOneGpu);
  ASSERT_TRUE(world.ok());
  world.runWithComms(netConfig(), [&](int rank, ncclMoeComm_t comm, cudaStream_t stream) {
    SCOPED_TRACE(describe(c));
    RankSession session(world, rank, comm, stream);
    const ref::RankRouting& rr = e.routing.ranks[rank];
    const ref::HtRankRecv& want = e.d1.recv[rank];
    const bool short_rank = overflows(rank);
    const int capacity = short_rank ? want.num_recv - kShort : std::max(want.num_recv, 1);
    const int H = c.hidden, K = c.topk, rows = capacity + kGuardRows;
    const DeviceBytes idx = uploadIds(c, rr);
    DispatchInputs in;
    DispatchOutputs out;
    uploadInputs(e.x1[rank], rr, 0, &in);
    out.allocate(rows, H, K, false, c.idx64, 0);
    out.x.fill(kFill);
    out.idx.fill(kFill);
    out.weights.fill(kFill);
    out.rows = capacity;
    int num_recv = -1;
    std::vector<int> per_expert;
    ncclMoeNotifyArgs_t na = notifyArgs(c, e.capacity, n, idx, rr.num_tokens, &num_recv, &per_expert);
    na.recv_capacity = capacity;
    session.call("notify", [&] { return ncclMoeDispatchNotify(comm, session.handle(), &na, stream); });
    const ncclMoeDispatchArgs_t da = dispatchArgs(c, in, out);
    if (!anyRankFailed(world)) {
      ncclResult_t res = ncclMoeDispatch(comm, session.handle(), &da, stream);
      std::string msg = ncclMoeGetLastError(comm);
      if (res == ncclSuccess) {
        EXPECT_EQ(cudaSuccess, cudaStreamSynchronize(stream)) << "rank " << rank;
        ncclResult_t async = ncclSuccess;
        EXPECT_EQ(ncclSuccess, ncclMoeCommGetAsyncError(comm, &async));
        res = async;
        msg = ncclMoeGetLastError(comm);
      }
      if (short_rank) {
        EXPECT_EQ(ncclInvalidUsage, res) << "rank " << rank << " (capacity " << capacity << ", N_recv " << want.num_recv
                                         << "): " << msg;
        EXPECT_NE(std::string::npos, msg.find("capacity")) << "rank " << rank << ": " << msg;
        EXPECT_NE(std::string::npos, msg.find(std::to_string(capacity)))
            << "rank " << rank << ": the message should name the capacity " << capacity << ": " << msg;
      } else {
        EXPECT_EQ(ncclSuccess, res) << "rank " << rank << ": " << msg;
        if (res == ncclSuccess) checkDispatch(c, want, out, rank, "dispatch at exactly N_recv rows");
      }
      // The guard rows after the capacity keep their fill on every rank.
      const size_t row_bytes[3] = {2 * static_cast<size_t>(H), static_cast<size_t>(K) * (c.idx64 ? 8 : 4),
                                   static_cast<size_t>(K) * 4};
      const DeviceBytes* buffers[3] = {&out.x, &out.idx, &out.weights};
      const char* names[3] = {"recv_x", "recv_topk_idx", "recv_topk_weights"};
      for (int b = 0; b < 3; ++b) {
        const auto bytes = buffers[b]->download<uint8_t>(rows * row_bytes[b]);
        for (size_t i = capacity * row_bytes[b]; i < bytes.size(); ++i) {
          if (bytes[i] != kFill) {
            ADD_FAILURE() << "rank " << rank << " " << names[b] << " row " << i / row_bytes[b]
                          << " at or past the capacity " << capacity << " was written";
            break;
          }
        }
      }
    }
    world.barrier().wait();
    cudaStreamSynchronize(stream);
    world.barrier().wait();  // no buffer is freed while a peer's kernel may still read it
  });
}

INSTANTIATE_TEST_SUITE_P(Shapes, HtNet, ::testing::ValuesIn(net_test::shapes()), net_test::shapeName);

}  // namespace
}  // namespace ht_test
