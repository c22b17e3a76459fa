// The educational high-throughput kernels (src/kernels/intranode/educational.cu, NCCL_MOE_HT_KERNEL=educational)
// on real GPUs against the CPU reference, bitwise, like tests/gpu/ht_dispatch_test.cc tests the fast ones.
//
// Every case runs with R = 2, 4 and 8 ranks (threads; one per GPU, or all on one GPU: tests/gpu/gpu_world.h): notify,
// dispatch, cached re-dispatch of new data, combine, each output field compared with ref::ht_dispatch /
// ref::ht_combine. The kernel selection is read on every call, so each call step is enqueued rank by rank (a host
// barrier between ranks) with the variable set for that rank and step: cases run everything educational, or mix the two
// versions between calls and between ranks of one call (same buffer protocol, so they must interoperate). Also: a
// worst-case capacity overflow is reported by the educational dispatch exactly as by the fast one.
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <string>

#include "harness/scoped_env.h"
#include "ht_case.h"

namespace ht_test {
namespace {

constexpr const char* kKernelVar = "NCCL_MOE_HT_KERNEL";

// A fast-path case plus which kernel runs each step.
struct EduCase : HtCase {
  // Kernel of each step (dispatch, cached dispatch, combine): 'E' educational on every rank, 'F' fast on
  // every rank, 'M' educational on even ranks and fast on odd ones.
  std::string plan = "EEE";
};

std::ostream& operator<<(std::ostream& os, const EduCase& c) { return os << c.name; }

bool educationalAt(const EduCase& c, int step, int rank) {
  const char k = c.plan[step];
  return k == 'E' || (k == 'M' && rank % 2 == 0);
}

// ---- The flow of one case on one rank. ----

// Enqueues one call step on every rank in turn, each with its own kernel selection (the variable is read by
// the host when the call is enqueued). Every rank makes the same number of these calls, whether or not it
// has failed, so the barriers always pair up.
//
// A barrier comes first: a rank still freeing the buffers of its previous step (cudaFree waits for the whole
// device) must not find a peer's new kernel waiting for a call it cannot enqueue before that wait ends.
template <typename Fn>
void enqueueInTurn(World& world, int rank, bool educational, Fn enqueue) {
  world.barrier().wait();
  for (int turn = 0; turn < world.size(); ++turn) {
    if (turn == rank) {
      setenv(kKernelVar, educational ? "educational" : "fast", 1);
      enqueue();
    }
    world.barrier().wait();
  }
}

void runRank(const EduCase& c, const Expected& e, World& world, int rank, ncclMoeComm_t comm, cudaStream_t stream) {
  const int R = world.size();
  RankSession session(world, rank, comm, stream);
  const ref::RankRouting& rr = e.routing.ranks[rank];
  const int T = rr.num_tokens, K = c.topk, H = c.hidden;
  const DeviceBytes idx = uploadIds(c, rr);

  // Notify has one version; it fills the handle both dispatch versions read.
  int num_recv = -1;
  std::vector<int> per_expert;
  ncclMoeNotifyArgs_t na = notifyArgs(c, e.capacity, R, idx, T, &num_recv, &per_expert);
  session.call("notify", [&] { return ncclMoeDispatchNotify(comm, session.handle(), &na, stream); });
  const ref::HtRankRecv& want = e.d1.recv[rank];
  if (session.ok() && !c.worst_case) {
    EXPECT_EQ(want.num_recv, num_recv) << "rank " << rank;
    EXPECT_EQ(want.num_recv_per_expert, per_expert) << "rank " << rank;
  }
  const int rows = c.worst_case ? R * e.capacity : (num_recv > 0 ? num_recv : 0);

  // Dispatch, then a cached re-dispatch of new data with the same handle. Every rank takes its turns, failed or
  // not (enqueueInTurn's barriers).
  for (int pass = 0; pass < 2; ++pass) {
    const char* what = pass == 0 ? "dispatch" : "cached dispatch";
    DispatchInputs in;
    DispatchOutputs out;
    ncclResult_t res = ncclSuccess;
    if (session.ok()) {
      uploadInputs(pass == 0 ? e.x1[rank] : e.x2[rank], rr, c.scale_layout, &in);
      out.allocate(rows, H, K, c.dtype == ref::DType::kFp8E4M3, c.idx64, scaleWords(c));
    }
    ncclMoeDispatchArgs_t da = dispatchArgs(c, in, out);
    enqueueInTurn(world, rank, educationalAt(c, pass, rank), [&] {
      if (session.ok()) res = ncclMoeDispatch(comm, session.handle(), &da, stream);
    });
    session.finish(res, what);
    if (session.ok()) checkDispatch(c, pass == 0 ? e.d1.recv[rank] : e.d2.recv[rank], out, rank, what);
  }

  // Combine of the expert outputs y (in dispatch order).
  CombineCall cc(c, e, rank, rows);
  ncclResult_t res = ncclSuccess;
  enqueueInTurn(world, rank, educationalAt(c, 2, rank), [&] {
    if (session.ok()) res = ncclMoeCombine(comm, session.handle(), &cc.args, stream);
  });
  session.finish(res, "combine");
  if (session.ok()) cc.check(c, e, rank);
}

std::vector<EduCase> allCases() {
  std::vector<EduCase> v;
  auto add = [&](const char* name, std::function<void(EduCase&)> f) {
    EduCase c;
    c.name = name;
    c.seed = 500 + v.size();
    f(c);
    v.push_back(c);
  };
  using D = ref::DType;
  using F = ref::ScaleFormat;
  add("Bf16", [](EduCase&) {});
  add("Bf16Int32Align128Bias1", [](EduCase& c) {
    c.idx64 = false;
    c.alignment = 128;
    c.biases = 1;
  });
  add("Fp8FloatPaddedStrideBias2", [](EduCase& c) {
    c.dtype = D::kFp8E4M3;
    c.scale_layout = 1;
    c.biases = 2;
  });
  add("Fp8FloatColumnMajor", [](EduCase& c) {
    c.dtype = D::kFp8E4M3;
    c.scale_layout = 2;
    c.combine_weights = false;
  });
  add("Fp8Ue8m0ColumnMajorOddHidden", [](EduCase& c) {
    c.dtype = D::kFp8E4M3;
    c.format = F::kUe8m0;
    c.scale_layout = 2;
    c.hidden = 2064;
  });
  add("Top16Masked", [](EduCase& c) {
    c.topk = 16;
    c.masked = 0.3;
    c.num_experts = 128;
  });
  add("Top3MaskedEmptyAlign128", [](EduCase& c) {
    c.topk = 3;
    c.masked = 0.2;
    c.empty = 0.2;
    c.alignment = 128;
    c.idx64 = false;
  });
  add("ZeroTokenRank", [](EduCase& c) {
    c.zero_ranks = 1;
    c.biases = 1;
  });
  add("Skewed", [](EduCase& c) {
    c.skew = 4.0;
    c.tokens = 700;
  });
  add("Hidden136Bias2", [](EduCase& c) {
    c.hidden = 136;
    c.biases = 2;
  });
  add("NoWeights", [](EduCase& c) {
    c.weights = false;
    c.combine_weights = false;
  });
  add("WorstCaseBf16Bias2", [](EduCase& c) {
    c.worst_case = true;
    c.biases = 2;
  });
  add("WorstCaseFp8Ue8m0Int32", [](EduCase& c) {
    c.worst_case = true;
    c.dtype = D::kFp8E4M3;
    c.format = F::kUe8m0;
    c.idx64 = false;
  });
  add("OneSm", [](EduCase& c) {
    c.num_sms = 1;
    c.tokens = 64;
  });
  add("ManySmsFewTokens", [](EduCase& c) {
    c.num_sms = 64;
    c.tokens = 7;
  });
  add("LargeTokens", [](EduCase& c) {
    c.tokens = 4096;
    c.hidden = 512;
    c.num_experts = 256;
  });
  // Interoperation: the versions alternate between calls, and differ between ranks within one call.
  add("MixedCallsFastEducationalFast", [](EduCase& c) {
    c.plan = "FEF";
    c.biases = 2;
  });
  add("MixedCallsEducationalFastEducationalWorstCase", [](EduCase& c) {
    c.plan = "EFE";
    c.worst_case = true;
  });
  add("MixedRanksFp8Float", [](EduCase& c) {
    c.plan = "MMM";
    c.dtype = D::kFp8E4M3;
    c.num_sms = 5;
  });
  add("MixedRanksSkewedBias1", [](EduCase& c) {
    c.plan = "MMM";
    c.skew = 3.0;
    c.biases = 1;
    c.num_sms = 3;
  });
  return v;
}

class HtEducational : public ::testing::TestWithParam<std::tuple<EduCase, int>> {};

TEST_P(HtEducational, MatchesReference) {
  const int n = std::get<1>(GetParam());
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  EduCase c = std::get<0>(GetParam());
  c.num_sms = world.clampSms(c.num_sms);
  const Expected e = makeExpected(c, n);
  harness::ScopedEnv guard(kKernelVar);  // restored when the test ends (the rank threads have joined)
  world.runWithComms(caseConfig(c, e.capacity),
                     [&](int r, ncclMoeComm_t comm, cudaStream_t stream) { runRank(c, e, world, r, comm, stream); });
}

INSTANTIATE_TEST_SUITE_P(Ht, HtEducational,
                         ::testing::Combine(::testing::ValuesIn(allCases()),
                                            ::testing::ValuesIn(gpu_test::rankCounts())),
                         [](const ::testing::TestParamInfo<std::tuple<EduCase, int>>& info) {
                           return std::get<0>(info.param).name + "_R" + std::to_string(std::get<1>(info.param));
                         });

// Worst-case capacity below N_recv on rank 0: the educational dispatch reports it like the fast one and writes
// nothing past the capacity; the other ranks are unaffected.
class HtEducationalErrors : public ::testing::TestWithParam<int> {};

TEST_P(HtEducationalErrors, CapacityOverflowIsReportedAndNothingPastCapacityIsWritten) {
  Placement placement;
  GPU_WORLD_OR_SKIP(GetParam(), &placement);
  harness::ScopedEnv guard(kKernelVar);  // restored when the test ends (the rank threads have joined)
  setenv(kKernelVar, "educational", 1);
  checkCapacityOverflow(GetParam(), placement);
}

INSTANTIATE_TEST_SUITE_P(Ranks, HtEducationalErrors, ::testing::ValuesIn(gpu_test::rankCounts()), gpu_test::ranksName);

}  // namespace
}  // namespace ht_test
