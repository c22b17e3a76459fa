// Test harness of the low-latency GPU tests: runs one function per rank, each rank a thread, either
//   kGpus:     one rank per GPU, communicators from ncclCommInitAll + ncclMoeCommInit (the real path), or
//   kEmulated: all ranks on GPU 0, communicators built by hand with the same fields ncclMoeCommInit fills
//              (every rank's buffer is directly addressable on the one device), the SMs split evenly between
//              ranks so that every rank's LL kernel is resident at once (they wait on each other).
// The emulated world lets the protocol and the data path run on a machine with a single GPU; its timings
// say nothing about NVLink.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/comm.h"
#include "nccl_moe.h"
#include "reference/testing/generators.h"

namespace ll_test {

// Rank kernels spin on each other. In the emulated world all ranks' streams live on one device, and CUDA
// maps streams onto CUDA_DEVICE_MAX_CONNECTIONS hardware queues (default 8): two ranks sharing a queue
// would serialise a waiting kernel behind the kernel it waits for. Ask for the maximum before the runtime
// initialises (static initialisation runs before main; a value the user set is kept).
inline const bool kMaxConnectionsRequested = (setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0), true);

enum class World { kGpus, kEmulated };

inline int deviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}
inline int gpuRanks() { return std::min(deviceCount(), NCCL_MOE_MAX_RANKS); }

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
// Ranks of the emulated world: NCCL_MOE_LL_EMULATED_RANKS (2..8), default 2.
inline int emulatedRanks() {
  const char* env = std::getenv("NCCL_MOE_LL_EMULATED_RANKS");
  const int n = env ? std::atoi(env) : 2;
  return std::max(2, std::min(n, NCCL_MOE_MAX_RANKS));
}

// Host barrier of the rank threads. Call it after a rank's allocations and before its first collective
// kernel: an allocation (cudaMalloc, cudaHostAlloc, ...) may wait for the device, and a rank whose kernel
// already spins on a peer that is still allocating would deadlock until the device wait times out.
// Gives up (with a test failure) after 120 s, so a rank that died of an assertion cannot hang the others.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int gen = generation_;
    if (++count_ == n_) {
      count_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(120), [&] { return gen != generation_; }))
      ADD_FAILURE() << "rank barrier timed out";
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int n_, count_ = 0, generation_ = 0;
};

// Runs fn(rank, comm, stream) on one thread per rank; the stream is non-blocking and synchronised after fn.
template <typename Fn>
void forEachRankIn(World world, int n, const ncclMoeConfig_t& config, Fn fn) {
  if (world == World::kGpus) {
    std::vector<ncclComm_t> nccl(n);
    std::vector<int> devs(n);
    for (int i = 0; i < n; ++i) devs[i] = i;
    ASSERT_EQ(ncclSuccess, ncclCommInitAll(nccl.data(), n, devs.data()));
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) {
      threads.emplace_back([&, r] {
        ASSERT_EQ(cudaSuccess, cudaSetDevice(r));
        ncclMoeComm_t comm = nullptr;
        ncclMoeConfig_t c = config;
        ASSERT_EQ(ncclSuccess, ncclMoeCommInit(&comm, nccl[r], &c)) << ncclMoeGetLastError(nullptr);
        cudaStream_t stream = nullptr;
        ASSERT_EQ(cudaSuccess, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        fn(r, comm, stream);
        cudaStreamSynchronize(stream);
        cudaStreamDestroy(stream);
        ncclMoeCommDestroy(comm);
      });
    }
    for (auto& t : threads) t.join();
    for (auto c : nccl) ncclCommDestroy(c);
    return;
  }

  std::vector<ncclMoeComm_t> comms(n, nullptr);
  const std::vector<int> devs(n, 0);
  ncclMoeConfig_t c = config;
  ASSERT_EQ(ncclSuccess, ncclMoeCommInitAll(comms.data(), n, devs.data(), &c)) << ncclMoeGetLastError(nullptr);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      ASSERT_EQ(cudaSuccess, cudaSetDevice(0));
      cudaStream_t stream = nullptr;
      ASSERT_EQ(cudaSuccess, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      fn(r, comms[r], stream);
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    });
  }
  for (auto& t : threads) t.join();
  for (ncclMoeComm_t comm : comms) ncclMoeCommDestroy(comm);
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
    ok_ = alloc(&x_, T * H * 2) && alloc(&idx_, T * kTopk * 8) && alloc(&w_, T * kTopk * 4) &&
          alloc(&recv_x_, El * RM * H) && alloc(&recv_scales_, El * RM * (H / 128) * 4) &&
          alloc(&recv_count_, El * 4) && alloc(&y_, El * RM * H * 2) && alloc(&out_, T * H * 2);
    if (!ok_) return;
    cudaMemset(y_, 0, El * RM * H * 2);
    const std::vector<uint16_t> hx =
        nccl_moe::ref::make_bf16_rows(seed, rank, kMaxTokens, kHidden, nccl_moe::ref::ValueKind::kWide);
    cudaMemcpy(x_, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice);
    const std::vector<float> hw(T * kTopk, 0.125f);
    cudaMemcpy(w_, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice);
  }
  ~TargetShapeRank() {
    for (void* p : {x_, idx_, w_, recv_x_, recv_scales_, recv_count_, y_, out_})
      if (p != nullptr) cudaFree(p);
  }
  TargetShapeRank(const TargetShapeRank&) = delete;
  TargetShapeRank& operator=(const TargetShapeRank&) = delete;

  bool ok() const { return ok_; }  // every buffer was allocated
  int* recvCount() const { return static_cast<int*>(recv_count_); }

  // Uploads the routing of T tokens: kTopk distinct experts per token, uniform (the reference's generator).
  void route(int T, uint64_t seed) {
    const std::vector<int64_t> h = uniformRouting(rank_, num_ranks_, kExperts, kTopk, T, seed);
    cudaMemcpy(idx_, h.data(), h.size() * 8, cudaMemcpyHostToDevice);
  }

  ncclMoeLLDispatchArgs_t dispatchArgs(int T) const {
    ncclMoeLLDispatchArgs_t a = NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER;
    a.x = x_;
    a.topk_idx = idx_;
    a.num_tokens = T;
    a.hidden = kHidden;
    a.topk = kTopk;
    a.use_fp8 = 1;
    a.scale_format = ncclMoeScaleFloat;
    a.recv_x = recv_x_;
    a.recv_x_scales = recv_scales_;
    a.recv_count = recvCount();
    a.topk_weights = static_cast<const float*>(w_);  // carried with the tokens: no weight exchange in combine
    return a;
  }
  ncclMoeLLCombineArgs_t combineArgs(int T) const {
    ncclMoeLLCombineArgs_t a = NCCL_MOE_LL_COMBINE_ARGS_INITIALIZER;
    a.x = y_;
    a.topk_idx = idx_;
    a.topk_weights = nullptr;  // the dispatch's
    a.num_tokens = T;
    a.hidden = kHidden;
    a.topk = kTopk;
    a.out = out_;
    return a;
  }

 private:
  static bool alloc(void** p, size_t bytes) { return cudaMalloc(p, bytes) == cudaSuccess; }
  int rank_, num_ranks_;
  bool ok_ = false;
  void *x_ = nullptr, *idx_ = nullptr, *w_ = nullptr, *recv_x_ = nullptr, *recv_scales_ = nullptr,
       *recv_count_ = nullptr, *y_ = nullptr, *out_ = nullptr;
};

}  // namespace ll_test

// Defines LlGpu.Name (one rank per GPU, needs 2) and LlEmulated.Name (emulatedRanks() ranks on GPU 0,
// needs 1), both
// running `void Name##Body(World world, int num_ranks)`.
#define LL_WORLD_TEST(Name)                                              \
  void Name##Body(::ll_test::World world, int num_ranks);                \
  TEST(LlGpu, Name) {                                                    \
    const int n = ::ll_test::gpuRanks();                                 \
    if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;              \
    Name##Body(::ll_test::World::kGpus, n);                              \
  }                                                                      \
  TEST(LlEmulated, Name) {                                               \
    if (::ll_test::deviceCount() < 1) GTEST_SKIP() << "needs a GPU";     \
    Name##Body(::ll_test::World::kEmulated, ::ll_test::emulatedRanks()); \
  }                                                                      \
  void Name##Body(::ll_test::World world, int num_ranks)
