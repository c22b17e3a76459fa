// The educational high-throughput kernels (src/kernels/intranode/educational.cu, NCCL_MOE_HT_KERNEL=educational)
// on real GPUs against the CPU reference, bitwise, like tests/gpu/ht_dispatch_test.cc tests the fast ones.
//
// Every case runs on all GPUs of the machine (one thread per rank): notify, dispatch, cached re-dispatch of new
// data, combine, each output field compared with ref::ht_dispatch / ref::ht_combine. The kernel selection is
// read on every call, so each call step is enqueued rank by rank (a host barrier between ranks) with the
// variable set for that rank and step: cases run everything educational, or mix the two versions between
// calls and between ranks of one call (same buffer protocol, so they must interoperate). Also: a worst-case
// capacity overflow is reported by the educational dispatch exactly as by the fast one.
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <string>

#include "ht_case.h"

namespace ht_test {
namespace {

constexpr const char* kKernelVar = "NCCL_MOE_HT_KERNEL";

// Restores NCCL_MOE_HT_KERNEL when a test ends (the rank threads have joined by then).
class KernelVarGuard {
 public:
  KernelVarGuard() {
    const char* v = std::getenv(kKernelVar);
    had_ = v != nullptr;
    if (had_) saved_ = v;
  }
  ~KernelVarGuard() {
    if (had_)
      setenv(kKernelVar, saved_.c_str(), 1);
    else
      unsetenv(kKernelVar);
  }

 private:
  bool had_ = false;
  std::string saved_;
};

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
template <typename Fn>
void enqueueInTurn(World& world, int rank, bool educational, Fn enqueue) {
  for (int turn = 0; turn < world.size(); ++turn) {
    if (turn == rank) {
      setenv(kKernelVar, educational ? "educational" : "fast", 1);
      enqueue();
    }
    world.barrier().wait();
  }
}

void runRank(const EduCase& c, const Expected& e, World& world, int rank) {
  const int R = world.size();
  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = c.num_experts;
  config.hidden = c.hidden;
  config.max_topk = c.topk;
  config.max_tokens_per_rank = e.capacity;
  config.num_sms = c.num_sms;
  ncclMoeComm_t comm = nullptr;
  ASSERT_EQ(ncclSuccess, ncclMoeCommInit(&comm, world.nccl(rank), &config)) << ncclMoeGetLastError(nullptr);
  ncclMoeHandle_t handle = nullptr;
  bool ok = ncclMoeHandleCreate(comm, &handle) == ncclSuccess;
  EXPECT_TRUE(ok) << ncclMoeGetLastError(comm);
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  // Waits for an enqueued call and checks both its return value and the communicator's async error.
  auto finish = [&](ncclResult_t res, const char* what) {
    if (!ok) return;
    if (res == ncclSuccess && cudaStreamSynchronize(stream) != cudaSuccess) res = ncclUnhandledCudaError;
    ncclResult_t async = ncclSuccess;
    if (res == ncclSuccess) ncclMoeCommGetAsyncError(comm, &async);
    if (res != ncclSuccess || async != ncclSuccess) {
      ADD_FAILURE() << "rank " << rank << " " << what << ": " << ncclMoeGetLastError(comm);
      ok = false;
    }
  };

  const ref::RankRouting& rr = e.routing.ranks[rank];
  const int T = rr.num_tokens, K = c.topk, H = c.hidden;
  const bool fp8 = c.dtype == ref::DType::kFp8E4M3;
  const int scale_words = !fp8                                   ? 0
                          : c.format == ref::ScaleFormat::kUe8m0 ? ref::num_packed_scales(H)
                                                                 : ref::num_scale_groups(H);
  DevBuf idx(rr.topk_idx.size() * 8 + 16);
  if (c.idx64)
    idx.upload(rr.topk_idx);
  else
    idx.upload(toInt32(rr.topk_idx));

  // Notify has one version; it fills the handle both dispatch versions read.
  ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  na.topk_idx = idx.get();
  na.topk_idx_type = c.idx64 ? ncclMoeIndexInt64 : ncclMoeIndexInt32;
  na.num_tokens = T;
  na.topk = K;
  na.expert_alignment = c.alignment;
  na.recv_capacity = c.worst_case ? R * e.capacity : 0;
  int num_recv = -1;
  const int El = c.num_experts / R;
  std::vector<int> per_expert(El, -1);
  na.num_recv_tokens = &num_recv;
  na.num_recv_tokens_per_expert = per_expert.data();
  if (ok) finish(ncclMoeDispatchNotify(comm, handle, &na, stream), "notify");
  const ref::HtRankRecv& want = e.d1.recv[rank];
  if (ok && !c.worst_case) {
    EXPECT_EQ(want.num_recv, num_recv) << "rank " << rank;
    EXPECT_EQ(want.num_recv_per_expert, per_expert) << "rank " << rank;
  }
  const int rows = c.worst_case ? R * e.capacity : (num_recv > 0 ? num_recv : 0);

  // Dispatch, then a cached re-dispatch of new data with the same handle.
  for (int pass = 0; pass < 2; ++pass) {
    const char* what = pass == 0 ? "dispatch" : "cached dispatch";
    DispatchInputs in;
    DispatchOutputs out;
    ncclResult_t res = ncclSuccess;
    if (ok) {
      uploadInputs(pass == 0 ? e.x1[rank] : e.x2[rank], rr, c.scale_layout, &in);
      out.alloc(rows, H, K, fp8, c.idx64, scale_words);
    }
    ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
    da.x = in.x.get();
    da.dtype = fp8 ? ncclMoeFp8E4M3 : ncclMoeBfloat16;
    da.hidden = H;
    if (fp8) {
      da.x_scales = in.scales.get();
      da.scale_format = c.format == ref::ScaleFormat::kUe8m0 ? ncclMoeScaleUe8m0 : ncclMoeScaleFloat;
      da.x_scales_token_stride = in.token_stride;
      da.x_scales_channel_stride = in.word_stride;
      da.recv_x_scales = out.scales.get();
    }
    da.topk_weights = c.weights ? in.weights.get<float>() : nullptr;
    da.recv_x = out.x.get();
    da.recv_topk_idx = out.idx.get();
    da.recv_topk_weights = c.weights ? out.weights.get<float>() : nullptr;
    da.num_sms = c.num_sms;
    enqueueInTurn(world, rank, educationalAt(c, pass, rank), [&] {
      if (ok) res = ncclMoeDispatch(comm, handle, &da, stream);
    });
    finish(res, what);
    if (ok) checkDispatch(c, pass == 0 ? e.d1.recv[rank] : e.d2.recv[rank], out, rank, what);
  }

  // Combine of the expert outputs y (in dispatch order).
  {
    const size_t yrows = rows > 0 ? rows : 1;
    DevBuf y(yrows * H * 2), yw(yrows * K * 4);
    DevBuf b0(static_cast<size_t>(T) * H * 2 + 16), b1(static_cast<size_t>(T) * H * 2 + 16);
    DevBuf out(static_cast<size_t>(T) * H * 2 + 16), out_w(static_cast<size_t>(T) * K * 4 + 16);
    y.upload(e.y[rank]);
    yw.upload(e.yw[rank]);
    b0.upload(e.b0[rank]);
    b1.upload(e.b1[rank]);
    ncclMoeCombineArgs_t ca = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
    ca.x = y.get();
    ca.hidden = H;
    ca.topk_weights = c.combine_weights ? yw.get<float>() : nullptr;
    ca.combined_topk_weights = c.combine_weights ? out_w.get<float>() : nullptr;
    ca.bias_0 = c.biases >= 1 ? b0.get() : nullptr;
    ca.bias_1 = c.biases >= 2 ? b1.get() : nullptr;
    ca.combined_x = out.get();
    ca.num_sms = c.num_sms;
    ncclResult_t res = ncclSuccess;
    enqueueInTurn(world, rank, educationalAt(c, 2, rank), [&] {
      if (ok) res = ncclMoeCombine(comm, handle, &ca, stream);
    });
    finish(res, "combine");
    if (ok) {
      auto got = out.download<uint16_t>(static_cast<size_t>(T) * H);
      const long long i = firstDiff(got.data(), e.c.x[rank].data(), got.size());
      EXPECT_EQ(-1, i) << "rank " << rank << " combine token " << (i < 0 ? -1 : i / H) << " channel "
                       << (i < 0 ? -1 : i % H) << ": " << (i < 0 ? 0 : got[i])
                       << " != " << (i < 0 ? 0 : e.c.x[rank][i]);
      if (c.combine_weights) {
        auto gw = out_w.download<float>(static_cast<size_t>(T) * K);
        EXPECT_EQ(-1, firstDiff(gw.data(), e.c.topk_weights[rank].data(), gw.size()))
            << "rank " << rank << " combined weights";
      }
    }
  }
  cudaStreamDestroy(stream);
  ncclMoeHandleDestroy(handle);
  EXPECT_EQ(ncclSuccess, ncclMoeCommDestroy(comm)) << ncclMoeGetLastError(nullptr);
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

class HtEducational : public ::testing::TestWithParam<EduCase> {};

TEST_P(HtEducational, MatchesReference) {
  const int n = worldSize();
  if (n < minRanks()) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  const EduCase& c = GetParam();
  const Expected e = makeExpected(c, n);
  KernelVarGuard guard;
  World world(n);
  ASSERT_TRUE(world.ok());
  world.run([&](int r) { runRank(c, e, world, r); });
}

INSTANTIATE_TEST_SUITE_P(Ht, HtEducational, ::testing::ValuesIn(allCases()),
                         [](const ::testing::TestParamInfo<EduCase>& info) { return info.param.name; });

// Worst-case capacity below N_recv on rank 0: the educational dispatch reports it like the fast one and writes
// nothing past the capacity; the other ranks are unaffected.
TEST(HtEducationalErrors, CapacityOverflowIsReportedAndNothingPastCapacityIsWritten) {
  KernelVarGuard guard;
  setenv(kKernelVar, "educational", 1);
  checkCapacityOverflow();
}

}  // namespace
}  // namespace ht_test
