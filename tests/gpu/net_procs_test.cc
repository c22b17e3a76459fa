// Internode LL and HT calls with the ranks in SEVERAL PROCESSES on GPU 0, each process its own node, over the
// software NIC (NCCL_MOE_NET=emulated, its IPC memory backend): the parent test spawns n copies of this binary
// (tests/gpu/procs.h), each with NCCL_MOE_HOSTID empty and its own NCCL_HOSTID=vnode<r> (NCCL then accepts several
// ranks on one GPU, and NCCL-MoE makes each process a node), NCCL_MOE_NET_MODE=ibgda, proxy or dbproxy, the NIC's chaos
// mode on (NCCL_MOE_EMU_CHAOS=20261202; NCCL_MOE_NET_TEST_CHAOS overrides the seed, 0 = off) and NCCL_MOE_TIMEOUT_S=20
// (unless set). Each child creates an NCCL communicator over NCCL_COMM_ID and one MoE communicator (ncclMoeCommInit,
// sized for both LL and HT), checks that it has n nodes, and runs its rank's side of:
//
//   LL   5 problems of ll_case.h (bf16; fp8 with float, pow2 and UE8M0 scales; H 256, 384, one 7168; K 1..8; masked
//        slots, empty tokens, a zero-token rank, int32 ids; weights to the combine, to the dispatch only, or both;
//        one with split send/receive halves and a zero-copy combine), dispatch and combine checked bit for bit
//        against the reference (ll_case.h's Expected, computed identically on every process from the seed), and
//        the cumulative receive stats of the both-phase calls
//   HT   5 HtCase problems (bf16; fp8 with UE8M0 and with float scales in a padded layout; H 136..256 and one 7168;
//        host-count and worst-case modes, recv_capacity differing between ranks; int32/int64 ids; masked slots,
//        expert alignment, a zero-token rank; combine with and without weights, 0..2 biases), each a notify, a
//        dispatch, a cached re-dispatch of new data and a combine, checked as ht_net_test.cc does: the dispatch
//        against ref::ht_dispatch, the combine against the two-level ref::ht_combine_nodes over
//        NodeMap::consecutive(n, per_node)
//
// The ranks synchronise with an NCCL barrier where the in-process tests (ll_net_test.cc, ht_net_test.cc) use the
// World barrier: before each HT call, after each problem, before buffers are freed; after each problem all ranks
// agree whether any failed and stop together. Each child prints one line per problem. The parent asserts that every
// child exits 0 within procs_test::kChildTimeoutS (180 s; a child still running then is killed and named).
//
// Instances: Procs/NetProcs.LlAndHtMatchTheReference/{2,4,2x2}_{ibgda,proxy}, {2,2x2}_dbproxy; 2x2 = 4 processes, 2 per
// node (NCCL_HOSTID=vnode<r> as always -- NCCL refuses two ranks of one host on one GPU -- and NCCL_MOE_HOSTID=mnode<r
// / 2> groups them into the library's nodes): the node's two processes reach each other through CUDA IPC (the NVLink
// leg of the HT kernels, the same-node LL messages), the other node through the software NIC. Run on a machine with a
// GPU:
//   build/tests/nccl_moe_gpu_tests --gtest_filter='*NetProcs*'
// Without the MPS daemon the processes are time-sliced on the GPU (every device wait for a peer costs time slices,
// milliseconds per step): slow but correct; under MPS (scripts/procs-one-gpu.sh --mps shows how to start it) their
// kernels run concurrently.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ostream>
#include <string>
#include <vector>

#include "gpu_world.h"
#include "ht_case.h"
#include "ll_case.h"
#include "nccl_moe.h"
#include "procs.h"
#include "reference/reference.h"

namespace {

namespace ref = nccl_moe::ref;
using harness::DeviceBytes;
using procs_test::ChildRank;

// One communicator for both: E = 32 (16 local experts at 2 processes, 8 at 4), K up to 8, H up to 7168, HT capacity
// 32 tokens per rank, LL capacity 16.
constexpr int kExperts = 32, kMaxTopk = 8, kMaxHidden = 7168, kHtCapacity = 32, kLlTokens = 16;

ncclMoeConfig_t procsConfig() {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = kExperts;
  c.hidden = kMaxHidden;
  c.max_topk = kMaxTopk;
  c.max_tokens_per_rank = kHtCapacity;
  c.ll_max_tokens_per_rank = kLlTokens;
  return c;
}

// ---- Parent ----

struct ProcsParam {
  int procs;
  const char* mode;  // NCCL_MOE_NET_MODE: ibgda, proxy or dbproxy
  int per_node = 1;  // processes per node (the same NCCL_HOSTID): > 1 adds the NVLink leg through CUDA IPC
  std::string name() const {
    const std::string shape =
        per_node > 1 ? std::to_string(procs / per_node) + "x" + std::to_string(per_node) : std::to_string(procs);
    return shape + "_" + mode;
  }
};
void PrintTo(const ProcsParam& p, std::ostream* os) { *os << p.name(); }
std::string procsName(const ::testing::TestParamInfo<ProcsParam>& info) { return info.param.name(); }

class NetProcs : public ::testing::TestWithParam<ProcsParam> {};

TEST_P(NetProcs, LlAndHtMatchTheReference) {
  const ProcsParam p = GetParam();
  const int n = p.procs;
  // Every process on GPU 0, each its own node: one GPU is enough (the processes are time-sliced on it).
  if (gpu_test::gpuCount() < 1) GTEST_SKIP() << n << " processes: needs a GPU";
  const char* timeout_env = std::getenv("NCCL_MOE_TIMEOUT_S");
  const std::string timeout = timeout_env != nullptr && *timeout_env != '\0' ? timeout_env : "20";
  const char* chaos_env = std::getenv("NCCL_MOE_NET_TEST_CHAOS");
  const std::string chaos = chaos_env != nullptr ? chaos_env : "20261202";
  const auto own_node = [&](int r) {
    // NCCL refuses two ranks of one host on one GPU, so every process is its own NCCL host; with several
    // processes per node, NCCL_MOE_HOSTID groups them into the library's nodes.
    const std::string moe_host = p.per_node > 1 ? "mnode" + std::to_string(r / p.per_node) : "";
    return std::vector<std::string>{"NCCL_MOE_TEST_CHILD_DEVICE=0",
                                    "NCCL_MOE_HOSTID=" + moe_host,
                                    "NCCL_HOSTID=vnode" + std::to_string(r),
                                    "NCCL_MOE_TEST_CHILD_PER_NODE=" + std::to_string(p.per_node),
                                    "NCCL_MOE_NET=emulated",
                                    std::string("NCCL_MOE_NET_MODE=") + p.mode,
                                    "NCCL_MOE_EMU_CHAOS=" + chaos,
                                    "NCCL_MOE_TIMEOUT_S=" + timeout};
  };
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int> statuses = procs_test::spawnRanks(n, "NetProcsChild.DISABLED_LlAndHtChild", own_node);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(procs_test::allExitedZero(statuses, n)) << procs_test::describeExits(statuses);
  std::printf("[ NetProcs ] %s: %d processes on GPU 0, %.1f s (%s)\n", p.name().c_str(), n, s,
              procs_test::describeExits(statuses).c_str());
}

INSTANTIATE_TEST_SUITE_P(Procs, NetProcs,
                         ::testing::Values(ProcsParam{2, "ibgda"}, ProcsParam{2, "proxy"}, ProcsParam{2, "dbproxy"},
                                           ProcsParam{4, "ibgda"}, ProcsParam{4, "proxy"}, ProcsParam{4, "ibgda", 2},
                                           ProcsParam{4, "proxy", 2}, ProcsParam{4, "dbproxy", 2}),
                         procsName);

// ---- Child ----

// Every rank passes whether it has failed so far; true on every rank when any has (the same answer everywhere, so
// that all ranks stop together and none waits for a peer that stopped calling).
bool anyRankFailed(ChildRank& child) { return child.sum(::testing::Test::HasFailure() ? 1 : 0) != 0; }

// "[ NetProcs ] rank r/n (mode) <what>: ok|FAILED (t s)", flushed at once (a hung child is killed).
void report(const ChildRank& child, const std::string& what, bool ok, double seconds) {
  const char* mode = std::getenv("NCCL_MOE_NET_MODE");
  std::printf("[ NetProcs ] rank %d/%d (%s): %s: %s (%.2f s)\n", child.rank, child.size,
              mode != nullptr ? mode : "ibgda", what.c_str(), ok ? "ok" : "FAILED", seconds);
  std::fflush(stdout);
}

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- LL ----

struct LlProblem {
  ll_test::Problem pb;
  bool split = false;      // send halves, then receive halves (dispatch and combine)
  bool zero_copy = false;  // expert outputs written into the library's combine buffer
};

ll_test::Problem llBase(int n, uint64_t seed) {
  ll_test::Problem pb;
  pb.num_ranks = n;
  pb.num_experts = kExperts;
  pb.max_tokens = kLlTokens;  // the communicator's ll_max_tokens_per_rank (ll_case.h's row layout)
  pb.hidden = 256;
  pb.topk = 4;
  pb.seed = seed;
  return pb;
}

std::vector<LlProblem> llProblems(int n) {
  std::vector<LlProblem> v;
  {
    LlProblem p;  // bf16, weights to the combine
    p.pb = llBase(n, 8101);
    v.push_back(p);
  }
  {
    LlProblem p;
    p.pb = llBase(n, 8102);
    p.pb.fp8 = true;
    p.pb.format = ref::ScaleFormat::kFloat;
    p.pb.topk = 8;
    p.pb.masked = 0.25;
    p.pb.idx32 = true;
    p.pb.weights = 1;  // to the dispatch only
    v.push_back(p);
  }
  {
    LlProblem p;
    p.pb = llBase(n, 8103);
    p.pb.fp8 = true;
    p.pb.format = ref::ScaleFormat::kUe8m0;
    p.pb.hidden = 7168;
    p.pb.topk = 8;
    p.pb.tokens_per_rank.assign(n, 6);
    p.pb.weights = 2;  // to both
    v.push_back(p);
  }
  {
    LlProblem p;
    p.pb = llBase(n, 8104);
    p.pb.fp8 = true;
    p.pb.format = ref::ScaleFormat::kFloatPow2;
    p.pb.topk = 6;
    p.pb.empty = 0.2;
    p.pb.zero_token_ranks = 1;
    p.split = true;
    p.zero_copy = true;
    v.push_back(p);
  }
  {
    LlProblem p;
    p.pb = llBase(n, 8105);
    p.pb.topk = 1;
    p.pb.hidden = 384;
    p.pb.tokens_per_rank.assign(n, kLlTokens);  // every rank full
    v.push_back(p);
  }
  return v;
}

// This rank's side of every LL problem; false when any rank failed.
bool runLl(ChildRank& child, ncclMoeComm_t comm, cudaStream_t stream, const ncclMoeConfig_t& config) {
  const int rank = child.rank;
  ll_test::Rank rk;
  rk.init(rank, comm, stream, config);
  ll_test::RankResult res;
  rk.allocResult(res);
  DeviceBytes cumulative;
  cumulative.allocate(ll_test::atLeast16(static_cast<size_t>(rk.El) * 4));
  std::vector<int> want_cumulative(rk.El, 0);
  bool failed = anyRankFailed(child);  // also the barrier after every rank's allocations
  const std::vector<LlProblem> problems = llProblems(child.size);
  for (size_t i = 0; i < problems.size() && !failed; ++i) {
    const LlProblem& p = problems[i];
    const std::string what = "LL " + std::to_string(i) + " " + ll_test::describe(p.pb) +
                             (p.split ? ", split halves" : "") + (p.zero_copy ? ", zero-copy combine" : "");
    SCOPED_TRACE(what);
    const auto t0 = std::chrono::steady_clock::now();
    const ll_test::Expected ex = ll_test::makeExpected(p.pb);
    rk.uploadInputs(ex, res);
    if (p.split) {
      rk.dispatch(ex, res, ncclMoePhaseSend);
      rk.dispatch(ex, res, ncclMoePhaseRecv);
    } else {
      rk.dispatch(ex, res, ncclMoePhaseBoth, cumulative.as<int>());
      for (int j = 0; j < rk.El; ++j) want_cumulative[j] += ex.dispatch.recv[rank].recv_count[j];
    }
    const uint64_t hd = rk.checkDispatch(ex, res, what);
    EXPECT_EQ(ll_test::refDispatchHash(ex, rank), hd) << what << ": dispatch hash";
    rk.uploadExpertOutputs(ex, res, p.zero_copy);
    if (p.split) {
      rk.combine(ex, res, ncclMoePhaseSend, p.zero_copy);
      rk.combine(ex, res, ncclMoePhaseRecv, p.zero_copy);
    } else {
      rk.combine(ex, res, ncclMoePhaseBoth, p.zero_copy);
    }
    rk.checkCombine(ex, res, what);
    report(child, what, !::testing::Test::HasFailure(), since(t0));
    failed = anyRankFailed(child);
  }
  if (!failed) {
    std::vector<int> got(rk.El);
    cudaMemcpyAsync(got.data(), cumulative.get(), got.size() * 4, cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
    EXPECT_EQ(want_cumulative, got) << "cumulative receive stats, rank " << rank;
    EXPECT_STREQ("", ncclMoeGetLastError(comm)) << "rank " << rank;
    failed = anyRankFailed(child);
  }
  child.barrier();  // no buffer is freed while a peer's kernel or NIC may still use this rank's
  rk.freeResult(res);
  return !failed;
}

// ---- HT ----

ht_test::HtCase htBase(const char* name, uint64_t seed, int n) {
  ht_test::HtCase c;
  c.name = name;
  c.seed = seed;
  c.num_experts = kExperts;
  c.tokens = kHtCapacity;
  c.hidden = 256;
  c.topk = 8;
  // T of every rank drawn from 0..capacity (cases below may override it).
  ref::Rng rng(ref::mix_seed(seed, 77));
  for (int r = 0; r < n; ++r) c.tokens_per_rank.push_back(static_cast<int>(rng.below(kHtCapacity + 1)));
  return c;
}

std::vector<ht_test::HtCase> htCases(int n) {
  using D = ref::DType;
  using F = ref::ScaleFormat;
  std::vector<ht_test::HtCase> v;
  {
    ht_test::HtCase c = htBase("Bf16HostCountCombineWeightsBias1", 8201, n);
    c.biases = 1;
    v.push_back(c);
  }
  {
    ht_test::HtCase c = htBase("Fp8Ue8m0WorstCaseTop6MaskedInt32Bias2", 8202, n);
    c.dtype = D::kFp8E4M3;
    c.format = F::kUe8m0;
    c.worst_case = true;
    c.topk = 6;
    c.masked = 0.2;
    c.idx64 = false;
    c.biases = 2;
    v.push_back(c);
  }
  {
    ht_test::HtCase c = htBase("Fp8FloatPaddedScalesTop4NoCombineWeights", 8203, n);
    c.dtype = D::kFp8E4M3;
    c.format = F::kFloat;
    c.scale_layout = 1;
    c.topk = 4;
    c.combine_weights = false;
    v.push_back(c);
  }
  {
    ht_test::HtCase c = htBase("Bf16H7168Top4WorstCaseBias1", 8204, n);
    c.hidden = 7168;
    c.topk = 4;
    c.worst_case = true;
    c.biases = 1;
    for (int& t : c.tokens_per_rank) t = std::min(t, 8);  // few tokens at the large hidden size
    v.push_back(c);
  }
  {
    ht_test::HtCase c = htBase("Bf16H136Top1ZeroTokenRankNoWeightsAlign4", 8205, n);
    c.hidden = 136;
    c.topk = 1;
    c.tokens_per_rank.front() = 0;
    c.weights = false;
    c.combine_weights = false;
    c.alignment = 4;
    c.biases = 1;
    v.push_back(c);
  }
  return v;
}

std::string describe(const ht_test::HtCase& c) {
  std::string s = "HT " + c.name + " [seed " + std::to_string(c.seed) + ", H " + std::to_string(c.hidden) + ", K " +
                  std::to_string(c.topk) + ", ";
  s += c.dtype == ref::DType::kBf16 ? "bf16" : c.format == ref::ScaleFormat::kUe8m0 ? "fp8/ue8m0" : "fp8/float";
  s += c.worst_case ? ", worst-case" : ", host-count";
  s += ", T";
  for (int t : c.tokens_per_rank) s += " " + std::to_string(t);
  s += c.combine_weights ? ", combine weights" : "";
  s += ", " + std::to_string(c.biases) + " bias(es)]";
  return s;
}

// Worst-case mode: the recv_capacity of `rank`, differing between ranks (as ht_net_test.cc's sweep): R x capacity
// (the largest accepted), N_recv + 3, or exactly N_recv (at least 1: 0 would be host-count mode).
int recvCapacity(const ht_test::Expected& e, int rank, int num_ranks) {
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

// ht_case.h's RankSession with the NCCL barrier of the processes: every collective call after a barrier, then its
// completion and the communicator's async error; after a failed step ok() is false and nothing more is enqueued
// (the rank still takes part in the barriers).
class ProcSession {
 public:
  ProcSession(ChildRank& child, ncclMoeComm_t comm, cudaStream_t stream) : child_(child), comm_(comm), stream_(stream) {
    ok_ = ncclMoeHandleCreate(comm_, &handle_) == ncclSuccess;
    EXPECT_TRUE(ok_) << "rank " << child.rank << " handle: " << ncclMoeGetLastError(comm_);
  }
  ~ProcSession() {
    if (handle_ != nullptr) ncclMoeHandleDestroy(handle_);
  }
  ProcSession(const ProcSession&) = delete;
  ProcSession& operator=(const ProcSession&) = delete;

  template <typename Enqueue>
  void call(const char* what, Enqueue enqueue) {
    child_.barrier();
    if (!ok_) return;
    ncclResult_t res = enqueue();
    if (res == ncclSuccess && cudaStreamSynchronize(stream_) != cudaSuccess) res = ncclUnhandledCudaError;
    ncclResult_t async = ncclSuccess;
    if (res == ncclSuccess) ncclMoeCommGetAsyncError(comm_, &async);
    if (res != ncclSuccess || async != ncclSuccess) {
      ADD_FAILURE() << "rank " << child_.rank << " " << what << ": " << ncclMoeGetLastError(comm_);
      ok_ = false;
    }
  }
  bool ok() const { return ok_; }
  ncclMoeHandle_t handle() const { return handle_; }

 private:
  ChildRank& child_;
  ncclMoeComm_t comm_;
  cudaStream_t stream_;
  ncclMoeHandle_t handle_ = nullptr;
  bool ok_ = false;
};

// One problem on this rank, as ht_net_test.cc's runProblem: notify, dispatch, cached re-dispatch of new data and
// combine, each after a barrier and checked once complete; buffers allocated before the first barrier and freed
// after the last.
void runHtProblem(const ht_test::HtCase& c, const ht_test::Expected& e, ChildRank& child, ProcSession& session,
                  ncclMoeComm_t comm, cudaStream_t stream) {
  SCOPED_TRACE(describe(c));
  const int rank = child.rank, R = child.size, K = c.topk, H = c.hidden;
  const ref::RankRouting& rr = e.routing.ranks[rank];
  const ref::HtRankRecv& want = e.d1.recv[rank];
  const int max_rows = R * e.capacity;
  const bool fp8 = c.dtype == ref::DType::kFp8E4M3;
  const DeviceBytes idx = ht_test::uploadIds(c, rr);
  ht_test::DispatchInputs in[2];
  ht_test::DispatchOutputs out[2];
  for (int pass = 0; pass < 2; ++pass) {
    ht_test::uploadInputs(pass == 0 ? e.x1[rank] : e.x2[rank], rr, c.scale_layout, &in[pass]);
    out[pass].allocate(max_rows, H, K, fp8, c.idx64, ht_test::scaleWords(c));
  }
  ht_test::CombineCall cc(c, e, rank, max_rows);
  int num_recv = -1;
  std::vector<int> per_expert;
  ncclMoeNotifyArgs_t na = ht_test::notifyArgs(c, e.capacity, R, idx, rr.num_tokens, &num_recv, &per_expert);
  if (c.worst_case) na.recv_capacity = recvCapacity(e, rank, R);

  session.call("notify", [&] { return ncclMoeDispatchNotify(comm, session.handle(), &na, stream); });
  if (session.ok()) ht_test::checkNotifyCounts(c, want, session.handle(), num_recv, per_expert, rank);
  for (int pass = 0; pass < 2; ++pass) {
    const char* what = pass == 0 ? "dispatch" : "cached dispatch";
    // Worst-case mode: rows up to the capacity must hold ids -1 / weights 0 past N_recv (checkDispatch).
    out[pass].rows = c.worst_case ? na.recv_capacity : std::max(num_recv, 0);
    const ncclMoeDispatchArgs_t da = ht_test::dispatchArgs(c, in[pass], out[pass]);
    session.call(what, [&] { return ncclMoeDispatch(comm, session.handle(), &da, stream); });
    if (session.ok()) ht_test::checkDispatch(c, pass == 0 ? want : e.d2.recv[rank], out[pass], rank, what);
  }
  session.call("combine", [&] { return ncclMoeCombine(comm, session.handle(), &cc.args, stream); });
  if (session.ok()) cc.check(c, e, rank);  // the two-level sum (makeExpected was given the node map)
  // Every rank's calls are complete before any buffer is freed.
  child.barrier();
}

// Processes per node, as the parent set it (NCCL_MOE_HOSTID=mnode<r / per_node> when > 1).
int perNode() {
  const char* v = std::getenv("NCCL_MOE_TEST_CHILD_PER_NODE");
  return v != nullptr && std::atoi(v) > 0 ? std::atoi(v) : 1;
}

// This rank's side of every HT problem (one handle for all); false when any rank failed.
bool runHt(ChildRank& child, ncclMoeComm_t comm, cudaStream_t stream) {
  const int n = child.size;
  const ref::NodeMap map = ref::NodeMap::consecutive(n, perNode());  // consecutive processes share a node
  const std::vector<ht_test::HtCase> cases = htCases(n);
  std::vector<ht_test::Expected> expected;
  for (const ht_test::HtCase& c : cases) {
    expected.push_back(ht_test::makeExpected(c, n, &map));
    expected.back().capacity = kHtCapacity;
  }
  bool failed = false;
  {
    ProcSession session(child, comm, stream);
    failed = anyRankFailed(child);
    for (size_t i = 0; i < cases.size() && !failed; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      runHtProblem(cases[i], expected[i], child, session, comm, stream);
      report(child, describe(cases[i]), !::testing::Test::HasFailure(), since(t0));
      failed = anyRankFailed(child);
    }
    child.barrier();  // the handle goes only after every rank's last call
  }
  return !failed;
}

TEST(NetProcsChild, DISABLED_LlAndHtChild) {
  ChildRank child;
  ASSERT_TRUE(child.init()) << "runs as a child of Procs/NetProcs.LlAndHtMatchTheReference";
  const auto t0 = std::chrono::steady_clock::now();
  const int n = child.size;
  ncclMoeConfig_t config = procsConfig();
  ncclMoeComm_t comm = nullptr;
  ASSERT_EQ(ncclSuccess, ncclMoeCommInit(&comm, child.nccl, &config)) << ncclMoeGetLastError(nullptr);
  report(child, "ncclMoeCommInit", true, since(t0));
  int nodes = 0;
  EXPECT_EQ(ncclSuccess, ncclMoeCommNodeCount(comm, &nodes)) << ncclMoeGetLastError(comm);
  EXPECT_EQ(n / perNode(), nodes)
      << "NCCL_HOSTID=vnode<r> with NCCL_MOE_HOSTID=mnode<r / per_node> (empty for 1) should give " << n / perNode()
      << " nodes of " << perNode() << " processes";
  cudaStream_t stream = nullptr;
  EXPECT_EQ(cudaSuccess, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // The same on every rank (the node count is agreed at init; a failure so far is shared by anyRankFailed).
  if (!anyRankFailed(child)) {
    const bool ll_ok = runLl(child, comm, stream, config);
    if (ll_ok) {
      runHt(child, comm, stream);
    } else {
      report(child, "HT skipped after the LL failure", false, 0.0);
    }
  }
  child.barrier();
  if (stream != nullptr) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
  EXPECT_EQ(ncclSuccess, ncclMoeCommDestroy(comm)) << ncclMoeGetLastError(nullptr);
  report(child, "done", !::testing::Test::HasFailure(), since(t0));
}

}  // namespace
