// Helpers of the low-latency GPU tests: the rank runner over the worlds of tests/gpu/gpu_world.h (one rank per
// GPU, or all ranks on GPU 0 through ncclMoeCommInitAll, whose timings say nothing about NVLink), routing from the
// reference's generator, and the buffers and arguments of the DeepEP-comparable decode shape.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gpu_world.h"
#include "nccl_moe.h"
#include "reference/testing/generators.h"

namespace ll_test {

using gpu_test::Placement;
using Barrier = harness::HostBarrier;

inline int deviceCount() { return gpu_test::gpuCount(); }
// Ranks of a one-rank-per-GPU world on this machine: every GPU, at most one node's worth.
inline int gpuRanks() { return std::min(deviceCount(), NCCL_MOE_MAX_NVL_PEERS); }

// Rank r's top-k ids of T tokens from the reference's generator: uniform over `experts`, `topk` distinct experts
// per token, no masked slots.
inline std::vector<int64_t> uniformRouting(int r, int num_ranks, int experts, int topk, int T, uint64_t seed) {
  nccl_moe::ref::RoutingSpec spec;
  spec.num_ranks = num_ranks;
  spec.num_experts = experts;
  spec.topk = topk;
  spec.num_tokens = T;
  spec.with_weights = false;
  spec.seed = seed;
  return nccl_moe::ref::make_rank_routing(spec, r).topk_idx;
}

// Runs fn(rank, comm, stream) on one thread per rank of an n-rank world placed as given; the stream is
// non-blocking and synchronised after fn. With ranks sharing a GPU, a rank's allocations must come before a host
// barrier that precedes its first collective call (gpu_world.h).
template <typename Fn>
void forEachRankIn(Placement placement, int n, const ncclMoeConfig_t& config, Fn fn) {
  gpu_test::World world(n, placement);
  ASSERT_TRUE(world.ok());
  world.runWithComms(config, fn);
}

// One rank's buffers and call arguments at the DeepEP-comparable decode shape (anchors.md) that the LL perf and
// trace tests time: hidden 7168, top-8 of 288 experts, up to 256 tokens per rank, FP8 dispatch (float scales)
// carrying top-k weights of 1/8, BF16 combine with the dispatch's weights. Activations: ref::make_bf16_rows.
class TargetShapeRank {
 public:
  static constexpr int kExperts = 288, kHidden = 7168, kTopk = 8, kMaxTokens = 256;

  static ncclMoeConfig_t config() {
    ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
    c.num_experts = kExperts;
    c.hidden = kHidden;
    c.max_topk = kTopk;
    c.ll_max_tokens_per_rank = kMaxTokens;
    return c;
  }

  TargetShapeRank(int rank, int num_ranks, uint64_t seed) : rank_(rank), num_ranks_(num_ranks) {
    const size_t El = kExperts / num_ranks, RM = static_cast<size_t>(num_ranks) * kMaxTokens;
    const size_t T = kMaxTokens, H = kHidden;
    try {
      x_.allocate(T * H * 2);
      idx_.allocate(T * kTopk * 8);
      w_.allocate(T * kTopk * 4);
      recv_x_.allocate(El * RM * H);
      recv_scales_.allocate(El * RM * (H / 128) * 4);
      recv_count_.allocate(El * 4);
      y_.allocate(El * RM * H * 2);
      out_.allocate(T * H * 2);
      x_.uploadBytes(nccl_moe::ref::make_bf16_rows(seed, rank, kMaxTokens, kHidden, nccl_moe::ref::ValueKind::kWide));
      w_.uploadBytes(std::vector<float>(T * kTopk, 0.125f));
      ok_ = true;
    } catch (const harness::Error&) {
      ok_ = false;
    }
  }
  TargetShapeRank(const TargetShapeRank&) = delete;
  TargetShapeRank& operator=(const TargetShapeRank&) = delete;

  bool ok() const { return ok_; }  // every buffer was allocated
  int* recvCount() const { return recv_count_.as<int>(); }

  // Uploads the routing of T tokens: kTopk distinct experts per token, uniform (the reference's generator).
  void route(int T, uint64_t seed) {
    const std::vector<int64_t> h = uniformRouting(rank_, num_ranks_, kExperts, kTopk, T, seed);
    idx_.uploadBytes(h);
  }

  ncclMoeLLDispatchArgs_t dispatchArgs(int T) const {
    ncclMoeLLDispatchArgs_t a = NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER;
    a.x = x_.get();
    a.topk_idx = idx_.get();
    a.num_tokens = T;
    a.hidden = kHidden;
    a.topk = kTopk;
    a.use_fp8 = 1;
    a.scale_format = ncclMoeScaleFloat;
    a.recv_x = recv_x_.get();
    a.recv_x_scales = recv_scales_.get();
    a.recv_count = recvCount();
    a.topk_weights = w_.as<float>();  // carried with the tokens: no weight exchange in combine
    return a;
  }
  ncclMoeLLCombineArgs_t combineArgs(int T) const {
    ncclMoeLLCombineArgs_t a = NCCL_MOE_LL_COMBINE_ARGS_INITIALIZER;
    a.x = y_.get();
    a.topk_idx = idx_.get();
    a.topk_weights = nullptr;  // the dispatch's
    a.num_tokens = T;
    a.hidden = kHidden;
    a.topk = kTopk;
    a.out = out_.get();
    return a;
  }

 private:
  int rank_, num_ranks_;
  bool ok_ = false;
  harness::DeviceBytes x_, idx_, w_, recv_x_, recv_scales_, recv_count_, y_, out_;
};

}  // namespace ll_test

// LL_WORLD_TEST(Name) { body } defines LlWorld.Name, instantiated for R = 2, 4 and 8 ranks; the body sees
// `Placement world` and `int num_ranks` (the test is skipped when R ranks cannot run on this machine).
class LlWorld : public ::testing::TestWithParam<int> {};
#define LL_WORLD_TEST(Name)                                   \
  void Name##Body(::ll_test::Placement world, int num_ranks); \
  TEST_P(LlWorld, Name) {                                     \
    ::ll_test::Placement placement;                           \
    GPU_WORLD_OR_SKIP(GetParam(), &placement);                \
    Name##Body(placement, GetParam());                        \
  }                                                           \
  void Name##Body(::ll_test::Placement world, int num_ranks)
