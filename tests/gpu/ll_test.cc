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
#include "ll_world.h"
#include "nccl_moe.h"
#include "reference/reference.h"
#include "reference/testing/compare.h"
#include "reference/testing/generators.h"

namespace {

namespace ref = nccl_moe::ref;
using ll_test::Barrier;
using ll_test::forEachRankIn;

#define CUDA_OK(x) ASSERT_EQ(cudaSuccess, (x)) << #x
#define MOE_OK(x) ASSERT_EQ(ncclSuccess, (x)) << #x << ": " << ncclMoeGetLastError(nullptr)

ncclMoeConfig_t llConfig(int experts, int hidden, int max_topk, int ll_tokens) {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = experts;
  c.hidden = hidden;
  c.max_topk = max_topk;
  c.max_tokens_per_rank = 0;
  c.ll_max_tokens_per_rank = ll_tokens;
  return c;
}

// ---------------------------------------------------------------------------------------------------------
// One problem: routing of all ranks, activations, expert outputs, and what the reference says.
// ---------------------------------------------------------------------------------------------------------

struct Problem {
  int num_ranks = 2, num_experts = 16, max_tokens = 16, hidden = 256, topk = 4;
  bool fp8 = false;
  ref::ScaleFormat format = ref::ScaleFormat::kFloat;
  bool idx32 = false;
  double masked = 0.0, empty = 0.0;
  int zero_token_ranks = 0;
  std::vector<int> tokens_per_rank;  // empty: random in [0, max_tokens]
  uint64_t seed = 1;
  int weights = 0;  // 0: given to the combine, 1: to the dispatch only (combine NULL), 2: to both
};

// Expert output y of rank d, slab j, row i, channel c: multiples of 1/16 in [-15/16, 15/16].
uint16_t expertValue(uint64_t seed, int d, int j, int i, int c) {
  const uint64_t h = ref::mix_seed(ref::mix_seed(seed, static_cast<uint64_t>(d * 65536 + j)), static_cast<uint64_t>(i));
  const int v = static_cast<int>((h >> 17) + static_cast<uint64_t>(c) * 7) % 31 - 15;
  return ref::float_to_bf16(static_cast<float>(v) / 16.0f);
}

struct Expected {
  Problem pb;
  ref::Routing routing;
  std::vector<std::vector<uint16_t>> x;  // [R][T_s, H]
  ref::LlDispatch dispatch;
  std::vector<std::vector<uint16_t>> y;    // [R][E_l, R*max, H], rows past the count are 0
  std::vector<std::vector<uint16_t>> out;  // [R][T_s, H]
};

Expected makeExpected(Problem pb) {
  Expected ex;
  if (pb.tokens_per_rank.empty()) {
    ref::Rng rng(ref::mix_seed(pb.seed, 999));
    for (int s = 0; s < pb.num_ranks; ++s)
      pb.tokens_per_rank.push_back(static_cast<int>(rng.below(static_cast<uint32_t>(pb.max_tokens + 1))));
  }
  ref::RoutingSpec spec;
  spec.num_ranks = pb.num_ranks;
  spec.num_experts = pb.num_experts;
  spec.topk = pb.topk;
  spec.tokens_per_rank = pb.tokens_per_rank;
  spec.masked_fraction = pb.masked;
  spec.empty_token_fraction = pb.empty;
  spec.num_zero_token_ranks = pb.zero_token_ranks;
  spec.seed = pb.seed;
  ex.routing = ref::make_routing(spec);
  ex.x = ref::make_bf16_rows_all(ex.routing, ref::mix_seed(pb.seed, 1), pb.hidden,
                                 pb.fp8 ? ref::ValueKind::kWide : ref::ValueKind::kExact);
  ex.dispatch = ref::ll_dispatch(ex.routing, pb.hidden, pb.max_tokens, &ex.x, pb.fp8, pb.format);
  const int El = pb.num_experts / pb.num_ranks, RM = pb.num_ranks * pb.max_tokens, H = pb.hidden;
  ex.y.resize(pb.num_ranks);
  for (int d = 0; d < pb.num_ranks; ++d) {
    ex.y[d].assign(static_cast<size_t>(El) * RM * H, 0);
    for (int j = 0; j < El; ++j)
      for (int i = 0; i < ex.dispatch.recv[d].recv_count[j]; ++i)
        for (int c = 0; c < H; ++c)
          ex.y[d][(static_cast<size_t>(j) * RM + i) * H + c] = expertValue(pb.seed, d, j, i, c);
  }
  ex.out = ref::ll_combine(ex.routing, ex.dispatch, ex.y);
  ex.pb = pb;
  return ex;
}

// ---------------------------------------------------------------------------------------------------------
// Per-rank device buffers of one LL result (sized for the communicator's maxima).
// ---------------------------------------------------------------------------------------------------------

using harness::DeviceBytes;

// At least 16 bytes, so that no buffer of an empty tensor is a 1-byte allocation.
size_t atLeast16(size_t n) { return std::max<size_t>(n, 16); }

struct RankResult {
  ncclMoeHandle_t handle = nullptr;
  DeviceBytes x, topk_idx, weights, recv_x, recv_scales, recv_count, y, out;
};

// Like CUDA_OK, for functions returning a value.
#define CUDA_OK_RET(x)                                       \
  do {                                                       \
    cudaError_t e_ = (x);                                    \
    if (e_ != cudaSuccess) {                                 \
      ADD_FAILURE() << #x << ": " << cudaGetErrorString(e_); \
      return 0;                                              \
    }                                                        \
  } while (0)

struct Rank {
  int rank = 0, R = 0;
  ncclMoeComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  ncclMoeConfig_t config{};
  int El = 0, RM = 0;

  void init(int r, ncclMoeComm_t c, cudaStream_t s, const ncclMoeConfig_t& cfg) {
    rank = r;
    comm = c;
    stream = s;
    config = cfg;
    ncclMoeCommCount(c, &R);
    El = cfg.num_experts / R;
    RM = R * cfg.ll_max_tokens_per_rank;
  }
  void allocResult(RankResult& res) {
    const size_t T = static_cast<size_t>(config.ll_max_tokens_per_rank), H = static_cast<size_t>(config.hidden),
                 K = static_cast<size_t>(config.max_topk);
    ASSERT_EQ(ncclSuccess, ncclMoeHandleCreate(comm, &res.handle));
    res.x.allocate(atLeast16(T * H * 2));
    res.topk_idx.allocate(atLeast16(T * K * 8));
    res.weights.allocate(atLeast16(T * K * 4));
    res.recv_x.allocate(atLeast16(static_cast<size_t>(El) * RM * H * 2));
    res.recv_scales.allocate(atLeast16(static_cast<size_t>(El) * RM * (H / 128 + 1) * 4));
    res.recv_count.allocate(atLeast16(static_cast<size_t>(El) * 4));
    res.y.allocate(atLeast16(static_cast<size_t>(El) * RM * H * 2));
    res.out.allocate(atLeast16(T * H * 2));
  }
  void freeResult(RankResult& res) {
    if (res.handle) ncclMoeHandleDestroy(res.handle);
    res.handle = nullptr;
  }

  // Uploads x, topk_idx and weights of this rank.
  void uploadInputs(const Expected& ex, RankResult& res) {
    const ref::RankRouting& rr = ex.routing.ranks[rank];
    const int T = rr.num_tokens;
    if (T == 0) return;
    CUDA_OK(cudaMemcpyAsync(res.x.get(), ex.x[rank].data(), ex.x[rank].size() * 2, cudaMemcpyHostToDevice, stream));
    if (ex.pb.idx32) {
      std::vector<int32_t> idx(rr.topk_idx.begin(), rr.topk_idx.end());
      CUDA_OK(cudaMemcpyAsync(res.topk_idx.get(), idx.data(), idx.size() * 4, cudaMemcpyHostToDevice, stream));
      CUDA_OK(cudaStreamSynchronize(stream));
    } else {
      CUDA_OK(cudaMemcpyAsync(res.topk_idx.get(), rr.topk_idx.data(), rr.topk_idx.size() * 8, cudaMemcpyHostToDevice,
                              stream));
    }
    CUDA_OK(cudaMemcpyAsync(res.weights.get(), rr.topk_weights.data(), rr.topk_weights.size() * 4,
                            cudaMemcpyHostToDevice, stream));
  }
  // Expert outputs into res.y, or into the library's combine buffer (zero copy).
  void uploadExpertOutputs(const Expected& ex, RankResult& res, bool zero_copy) {
    void* dst = res.y.get();
    if (zero_copy) {
      ASSERT_EQ(ncclSuccess, ncclMoeLowLatencyCombineBuffer(comm, res.handle, &dst)) << ncclMoeGetLastError(comm);
    }
    CUDA_OK(cudaMemcpyAsync(dst, ex.y[rank].data(), ex.y[rank].size() * 2, cudaMemcpyHostToDevice, stream));
  }

  ncclMoeLLDispatchArgs_t dispatchArgs(const Expected& ex, RankResult& res, ncclMoePhase_t phase,
                                       int* cumulative = nullptr) {
    ncclMoeLLDispatchArgs_t a = NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER;
    a.x = res.x.get();
    a.topk_idx = res.topk_idx.get();
    a.topk_idx_type = ex.pb.idx32 ? ncclMoeIndexInt32 : ncclMoeIndexInt64;
    a.num_tokens = ex.routing.ranks[rank].num_tokens;
    a.hidden = ex.pb.hidden;
    a.topk = ex.pb.topk;
    a.use_fp8 = ex.pb.fp8 ? 1 : 0;
    a.scale_format = static_cast<ncclMoeScaleFormat_t>(ex.pb.format);
    a.recv_x = res.recv_x.get();
    a.recv_x_scales = res.recv_scales.get();
    a.recv_count = res.recv_count.as<int>();
    a.cumulative_recv_stats = cumulative;
    a.phase = phase;
    a.topk_weights = ex.pb.weights != 0 ? res.weights.as<float>() : nullptr;
    return a;
  }
  ncclMoeLLCombineArgs_t combineArgs(const Expected& ex, RankResult& res, ncclMoePhase_t phase, bool zero_copy) {
    ncclMoeLLCombineArgs_t a = NCCL_MOE_LL_COMBINE_ARGS_INITIALIZER;
    a.x = zero_copy ? nullptr : res.y.get();
    a.zero_copy = zero_copy ? 1 : 0;
    a.topk_idx = res.topk_idx.get();
    a.topk_weights = ex.pb.weights != 1 ? res.weights.as<float>() : nullptr;
    a.num_tokens = ex.routing.ranks[rank].num_tokens;
    a.hidden = ex.pb.hidden;
    a.topk = ex.pb.topk;
    a.out = res.out.get();
    a.phase = phase;
    return a;
  }
  void dispatch(const Expected& ex, RankResult& res, ncclMoePhase_t phase, int* cumulative = nullptr) {
    ncclMoeLLDispatchArgs_t a = dispatchArgs(ex, res, phase, cumulative);
    ASSERT_EQ(ncclSuccess, ncclMoeLowLatencyDispatch(comm, res.handle, &a, stream)) << ncclMoeGetLastError(comm);
  }
  void combine(const Expected& ex, RankResult& res, ncclMoePhase_t phase, bool zero_copy) {
    ncclMoeLLCombineArgs_t a = combineArgs(ex, res, phase, zero_copy);
    ASSERT_EQ(ncclSuccess, ncclMoeLowLatencyCombine(comm, res.handle, &a, stream)) << ncclMoeGetLastError(comm);
  }

  // Compares this rank's dispatch outputs with the reference; returns a hash of the valid part.
  uint64_t checkDispatch(const Expected& ex, RankResult& res, const std::string& what) {
    CUDA_OK_RET(cudaStreamSynchronize(stream));
    const ref::LlRankRecv& want = ex.dispatch.recv[rank];
    const int H = ex.pb.hidden, G = H / 128, P = (G + 3) / 4;
    const size_t row_bytes = ex.pb.fp8 ? H : 2 * static_cast<size_t>(H);
    std::vector<int> count(El);
    std::vector<uint8_t> rx(static_cast<size_t>(El) * RM * row_bytes);
    std::vector<int32_t> info(static_cast<size_t>(El) * RM);
    const bool packed = ex.pb.format == ref::ScaleFormat::kUe8m0;
    const int scale_words = packed ? P : G;
    std::vector<uint32_t> sc(static_cast<size_t>(El) * RM * scale_words);
    cudaMemcpyAsync(count.data(), res.recv_count.get(), El * 4, cudaMemcpyDeviceToHost, stream);
    cudaMemcpyAsync(rx.data(), res.recv_x.get(), rx.size(), cudaMemcpyDeviceToHost, stream);
    cudaMemcpyAsync(info.data(), res.handle->ll.recv_src_info, info.size() * 4, cudaMemcpyDeviceToHost, stream);
    if (ex.pb.fp8) cudaMemcpyAsync(sc.data(), res.recv_scales.get(), sc.size() * 4, cudaMemcpyDeviceToHost, stream);
    CUDA_OK_RET(cudaStreamSynchronize(stream));
    uint64_t h = ref::kFnvOffset;
    int errors = 0;
    for (int j = 0; j < El && errors < 5; ++j) {
      EXPECT_EQ(want.recv_count[j], count[j]) << what << " rank " << rank << " expert " << j;
      if (want.recv_count[j] != count[j]) {
        ++errors;
        continue;
      }
      h = ref::fnv1a64(&count[j], 4, h);
      for (int i = 0; i < count[j] && errors < 5; ++i) {
        const size_t row = static_cast<size_t>(j) * RM + i;
        const uint8_t* got = &rx[row * row_bytes];
        const uint8_t* exp = ex.pb.fp8 ? &want.fp8[row * H] : reinterpret_cast<const uint8_t*>(&want.bf16[row * H]);
        if (std::memcmp(got, exp, row_bytes) != 0) {
          ADD_FAILURE() << what << " rank " << rank << " expert " << j << " row " << i << ": data differs (src "
                        << want.src_rank[row] << "/" << want.src_token[row] << ", got src info " << std::hex
                        << info[row] << std::dec << ")";
          ++errors;
        }
        if (info[row] != want.src_info[row]) {
          ADD_FAILURE() << what << " rank " << rank << " expert " << j << " row " << i << ": src info " << info[row]
                        << " expected " << want.src_info[row];
          ++errors;
        }
        h = ref::fnv1a64(got, row_bytes, h);
        h = ref::fnv1a64(&info[row], 4, h);
        if (ex.pb.fp8) {
          const void* exp_sc = packed ? static_cast<const void*>(&want.packed_scales[row * P])
                                      : static_cast<const void*>(&want.scales[row * G]);
          if (std::memcmp(&sc[row * scale_words], exp_sc, scale_words * 4) != 0) {
            ADD_FAILURE() << what << " rank " << rank << " expert " << j << " row " << i << ": scales differ";
            ++errors;
          }
          h = ref::fnv1a64(&sc[row * scale_words], scale_words * 4, h);
        }
      }
    }
    return h;
  }

  // Compares this rank's combine output with the reference bit for bit; returns a hash of it.
  uint64_t checkCombine(const Expected& ex, RankResult& res, const std::string& what) {
    CUDA_OK_RET(cudaStreamSynchronize(stream));
    const int T = ex.routing.ranks[rank].num_tokens, H = ex.pb.hidden;
    std::vector<uint16_t> out(static_cast<size_t>(T) * H);
    cudaMemcpyAsync(out.data(), res.out.get(), out.size() * 2, cudaMemcpyDeviceToHost, stream);
    CUDA_OK_RET(cudaStreamSynchronize(stream));
    int errors = 0;
    for (size_t i = 0; i < out.size() && errors < 5; ++i) {
      if (out[i] != ex.out[rank][i]) {
        ADD_FAILURE() << what << " rank " << rank << " combine token " << i / H << " channel " << i % H << ": got "
                      << ref::bf16_to_float(out[i]) << " (0x" << std::hex << out[i] << ") expected "
                      << ref::bf16_to_float(ex.out[rank][i]) << " (0x" << ex.out[rank][i] << std::dec << ")";
        ++errors;
      }
    }
    return ref::fnv1a64(out.data(), out.size() * 2);
  }
};
#undef CUDA_OK_RET

// Same hash as Rank::checkDispatch, computed from the reference.
uint64_t refDispatchHash(const Expected& ex, int rank) {
  const ref::LlRankRecv& want = ex.dispatch.recv[rank];
  const int El = ex.pb.num_experts / ex.pb.num_ranks, RM = ex.pb.num_ranks * ex.pb.max_tokens;
  const int H = ex.pb.hidden, G = H / 128, P = (G + 3) / 4;
  const size_t row_bytes = ex.pb.fp8 ? H : 2 * static_cast<size_t>(H);
  uint64_t h = ref::kFnvOffset;
  for (int j = 0; j < El; ++j) {
    h = ref::fnv1a64(&want.recv_count[j], 4, h);
    for (int i = 0; i < want.recv_count[j]; ++i) {
      const size_t row = static_cast<size_t>(j) * RM + i;
      h = ref::fnv1a64(
          ex.pb.fp8 ? static_cast<const void*>(&want.fp8[row * H]) : static_cast<const void*>(&want.bf16[row * H]),
          row_bytes, h);
      h = ref::fnv1a64(&want.src_info[row], 4, h);
      if (ex.pb.fp8) {
        if (ex.pb.format == ref::ScaleFormat::kUe8m0)
          h = ref::fnv1a64(&want.packed_scales[row * P], P * 4, h);
        else
          h = ref::fnv1a64(&want.scales[row * G], G * 4, h);
      }
    }
  }
  return h;
}

std::string describe(const Problem& pb) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "seed %llu H %d K %d %s%s idx%s masked %.2f empty %.2f zero-ranks %d weights %s",
                static_cast<unsigned long long>(pb.seed), pb.hidden, pb.topk, pb.fp8 ? "fp8/" : "bf16",
                pb.fp8 ? (pb.format == ref::ScaleFormat::kFloat       ? "float"
                          : pb.format == ref::ScaleFormat::kFloatPow2 ? "pow2"
                                                                      : "ue8m0")
                       : "",
                pb.idx32 ? "32" : "64", pb.masked, pb.empty, pb.zero_token_ranks,
                pb.weights == 0   ? "combine"
                : pb.weights == 1 ? "dispatch"
                                  : "both");
  return buf;
}

// Config shared by the functional tests: E = 8 * R (E_l = 8), hidden up to 640, K up to 16, 24 tokens.
constexpr int kTestHidden = 640;
constexpr int kTestTokens = 24;
ncclMoeConfig_t testConfig(int n) { return llConfig(8 * n, kTestHidden, 16, kTestTokens); }

Problem testProblem(int n, uint64_t seed) {
  Problem pb;
  pb.num_ranks = n;
  pb.num_experts = 8 * n;
  pb.max_tokens = kTestTokens;
  pb.seed = seed;
  return pb;
}

// ---------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------

LL_WORLD_TEST(DispatchCombineSweep) {
  const int n = num_ranks;
  std::vector<Problem> problems;
  uint64_t seed = 100;
  const ref::ScaleFormat formats[] = {ref::ScaleFormat::kFloat, ref::ScaleFormat::kFloatPow2, ref::ScaleFormat::kUe8m0};
  for (int dtype = 0; dtype < 4; ++dtype)
    for (int topk : {1, 4, 9, 16}) {
      Problem pb = testProblem(n, ++seed);
      pb.fp8 = dtype > 0;
      if (pb.fp8) pb.format = formats[dtype - 1];
      pb.topk = topk;
      pb.hidden = (seed % 2) ? 384 : 640;  // G = 3 / 5: ue8m0 words with unused bytes
      pb.idx32 = (seed % 3) == 0;
      pb.masked = (seed % 4) == 1 ? 0.3 : 0.0;
      pb.empty = (seed % 5) == 2 ? 0.2 : 0.0;
      pb.zero_token_ranks = (seed % 4) == 3 ? 1 : 0;
      pb.weights = static_cast<int>(seed % 3);
      problems.push_back(pb);
    }
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
      Problem pb = testProblem(n, ref::mix_seed(seed, static_cast<uint64_t>(it)));
      pb.fp8 = rng.below(2) != 0;
      pb.format = static_cast<ref::ScaleFormat>(rng.below(3));
      pb.topk = 1 + static_cast<int>(rng.below(16));
      pb.hidden = 128 * (1 + static_cast<int>(rng.below(5)));
      pb.idx32 = rng.below(2) != 0;
      pb.masked = rng.below(3) == 0 ? 0.25 : 0.0;
      pb.empty = rng.below(4) == 0 ? 0.2 : 0.0;
      pb.zero_token_ranks = rng.below(6) == 0 ? 1 : 0;
      pb.weights = static_cast<int>(rng.below(3));
      const bool split = rng.below(2) != 0;
      const bool zero_copy = rng.below(2) != 0;
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
