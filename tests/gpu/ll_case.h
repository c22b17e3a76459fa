// Shared by the low-latency GPU tests (ll_test.cc, pressure_test.cc): one seeded problem (routing of all ranks,
// activations, expert outputs) with what the reference says, one rank's device buffers and calls, the exact checks
// that return an FNV hash of what they compared, and the random problem of the pressure loops.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/handle.h"
#include "ll_world.h"
#include "nccl_moe.h"
#include "reference/reference.h"
#include "reference/testing/compare.h"
#include "reference/testing/generators.h"

namespace ll_test {

namespace ref = nccl_moe::ref;

#define LL_CUDA_OK(x) ASSERT_EQ(cudaSuccess, (x)) << #x

inline ncclMoeConfig_t llConfig(int experts, int hidden, int max_topk, int ll_tokens) {
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
inline uint16_t expertValue(uint64_t seed, int d, int j, int i, int c) {
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

// rank_mask (rank masks, optional): [R], 1 = masked; the reference then leaves those ranks out (ref::ll_dispatch).
inline Expected makeExpected(Problem pb, const std::vector<uint8_t>* rank_mask = nullptr) {
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
  ex.dispatch = ref::ll_dispatch(ex.routing, pb.hidden, pb.max_tokens, &ex.x, pb.fp8, pb.format, nullptr, rank_mask);
  const int El = pb.num_experts / pb.num_ranks, RM = pb.num_ranks * pb.max_tokens, H = pb.hidden;
  ex.y.resize(pb.num_ranks);
  for (int d = 0; d < pb.num_ranks; ++d) {
    ex.y[d].assign(static_cast<size_t>(El) * RM * H, 0);
    for (int j = 0; j < El; ++j)
      for (int i = 0; i < ex.dispatch.recv[d].recv_count[j]; ++i)
        for (int c = 0; c < H; ++c)
          ex.y[d][(static_cast<size_t>(j) * RM + i) * H + c] = expertValue(pb.seed, d, j, i, c);
  }
  ex.out = ref::ll_combine(ex.routing, ex.dispatch, ex.y, rank_mask);
  ex.pb = pb;
  return ex;
}

// ---------------------------------------------------------------------------------------------------------
// Per-rank device buffers of one LL result (sized for the communicator's maxima).
// ---------------------------------------------------------------------------------------------------------

using harness::DeviceBytes;

// At least 16 bytes, so that no buffer of an empty tensor is a 1-byte allocation.
inline size_t atLeast16(size_t n) { return std::max<size_t>(n, 16); }

struct RankResult {
  ncclMoeHandle_t handle = nullptr;
  DeviceBytes x, topk_idx, weights, recv_x, recv_scales, recv_count, y, out;
};

// Like LL_CUDA_OK, for functions returning a value.
#define LL_CUDA_OK_RET(x)                                    \
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
    LL_CUDA_OK(cudaMemcpyAsync(res.x.get(), ex.x[rank].data(), ex.x[rank].size() * 2, cudaMemcpyHostToDevice, stream));
    if (ex.pb.idx32) {
      std::vector<int32_t> idx(rr.topk_idx.begin(), rr.topk_idx.end());
      LL_CUDA_OK(cudaMemcpyAsync(res.topk_idx.get(), idx.data(), idx.size() * 4, cudaMemcpyHostToDevice, stream));
      LL_CUDA_OK(cudaStreamSynchronize(stream));
    } else {
      LL_CUDA_OK(cudaMemcpyAsync(res.topk_idx.get(), rr.topk_idx.data(), rr.topk_idx.size() * 8, cudaMemcpyHostToDevice,
                                 stream));
    }
    LL_CUDA_OK(cudaMemcpyAsync(res.weights.get(), rr.topk_weights.data(), rr.topk_weights.size() * 4,
                               cudaMemcpyHostToDevice, stream));
  }
  // Expert outputs into res.y, or into the library's combine buffer (zero copy).
  void uploadExpertOutputs(const Expected& ex, RankResult& res, bool zero_copy) {
    void* dst = res.y.get();
    if (zero_copy) {
      ASSERT_EQ(ncclSuccess, ncclMoeLowLatencyCombineBuffer(comm, res.handle, &dst)) << ncclMoeGetLastError(comm);
    }
    LL_CUDA_OK(cudaMemcpyAsync(dst, ex.y[rank].data(), ex.y[rank].size() * 2, cudaMemcpyHostToDevice, stream));
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
    LL_CUDA_OK_RET(cudaStreamSynchronize(stream));
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
    LL_CUDA_OK_RET(cudaStreamSynchronize(stream));
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
    LL_CUDA_OK_RET(cudaStreamSynchronize(stream));
    const int T = ex.routing.ranks[rank].num_tokens, H = ex.pb.hidden;
    std::vector<uint16_t> out(static_cast<size_t>(T) * H);
    cudaMemcpyAsync(out.data(), res.out.get(), out.size() * 2, cudaMemcpyDeviceToHost, stream);
    LL_CUDA_OK_RET(cudaStreamSynchronize(stream));
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
#undef LL_CUDA_OK_RET

// Same hash as Rank::checkDispatch, computed from the reference.
inline uint64_t refDispatchHash(const Expected& ex, int rank) {
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

inline std::string describe(const Problem& pb) {
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
inline ncclMoeConfig_t testConfig(int n) { return llConfig(8 * n, kTestHidden, 16, kTestTokens); }

inline Problem testProblem(int n, uint64_t seed) {
  Problem pb;
  pb.num_ranks = n;
  pb.num_experts = 8 * n;
  pb.max_tokens = kTestTokens;
  pb.seed = seed;
  return pb;
}

// The sweep of LlWorld.DispatchCombineSweep and LlNet.MatchesReferenceSweep: bf16 and fp8 x 3 scale formats times
// K in {1, 4, 9, 16}, 16 problems with seeds first_seed + 1, + 2, ..., whose seed picks H (384 or 640: G = 3 / 5,
// ue8m0 words with unused bytes), int32 ids, masked slots, empty tokens, a zero-token rank and where the weights go.
inline std::vector<Problem> sweepProblems(int n, uint64_t first_seed) {
  std::vector<Problem> problems;
  uint64_t seed = first_seed;
  const ref::ScaleFormat formats[] = {ref::ScaleFormat::kFloat, ref::ScaleFormat::kFloatPow2, ref::ScaleFormat::kUe8m0};
  for (int dtype = 0; dtype < 4; ++dtype)
    for (int topk : {1, 4, 9, 16}) {
      Problem pb = testProblem(n, ++seed);
      pb.fp8 = dtype > 0;
      if (pb.fp8) pb.format = formats[dtype - 1];
      pb.topk = topk;
      pb.hidden = (seed % 2) ? 384 : 640;
      pb.idx32 = (seed % 3) == 0;
      pb.masked = (seed % 4) == 1 ? 0.3 : 0.0;
      pb.empty = (seed % 5) == 2 ? 0.2 : 0.0;
      pb.zero_token_ranks = (seed % 4) == 3 ? 1 : 0;
      pb.weights = static_cast<int>(seed % 3);
      problems.push_back(pb);
    }
  return problems;
}

// One random iteration of the LL pressure loops (LlWorld.PressureLoop, pressure_test.cc): the problem of
// iteration `it` (its seed mix_seed(seed, it)) drawn from `rng` (the same stream on every rank), and whether its
// calls are split into send and receive halves and whether its combine is zero-copy.
inline Problem randomProblem(int n, uint64_t seed, int it, ref::Rng& rng, bool* split, bool* zero_copy) {
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
  *split = rng.below(2) != 0;
  *zero_copy = rng.below(2) != 0;
  return pb;
}

}  // namespace ll_test
