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
#include "reference/reference.h"

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

  ASSERT_EQ(cudaSuccess, cudaSetDevice(0));
  int sms = 0;
  ASSERT_EQ(cudaSuccess, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const char* env = std::getenv("NCCL_MOE_TIMEOUT_S");
  long long timeout_s = env ? std::atoll(env) : 100;
  if (timeout_s <= 0) timeout_s = 1;
  std::vector<std::unique_ptr<ncclMoeComm>> comms;
  for (int r = 0; r < n; ++r) {
    auto c = std::make_unique<ncclMoeComm>();
    c->rank = r;
    c->num_ranks = n;
    c->device = 0;
    c->num_device_sms = sms / n;
    c->default_num_sms = sms / n;
    c->config = config;
    c->params = nccl_moe::LayoutParams{n,
                                       config.num_experts,
                                       config.hidden,
                                       config.max_topk,
                                       config.max_tokens_per_rank,
                                       config.ll_max_tokens_per_rank};
    c->layout = nccl_moe::BufferLayout::make(c->params);
    ASSERT_EQ(cudaSuccess, cudaMalloc(&c->buffer, c->layout.total_bytes));
    ASSERT_EQ(cudaSuccess, cudaMemset(c->buffer, 0, c->layout.total_bytes));
    ASSERT_EQ(cudaSuccess, cudaHostAlloc(reinterpret_cast<void**>(&c->host_error), sizeof(nccl_moe::ErrorRecord),
                                         cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(c->host_error, 0, sizeof(nccl_moe::ErrorRecord));
    ASSERT_EQ(cudaSuccess, cudaHostGetDevicePointer(reinterpret_cast<void**>(&c->dev_error), c->host_error, 0));
    c->timeout_ns = static_cast<uint64_t>(timeout_s) * 1000000000ull;
    comms.push_back(std::move(c));
  }
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < n; ++i) {
      comms[r]->peer_buffer[i] = comms[i]->buffer;
      comms[r]->peer_same_process[i] = true;
    }
  ASSERT_EQ(cudaSuccess, cudaDeviceSynchronize());
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      ASSERT_EQ(cudaSuccess, cudaSetDevice(0));
      cudaStream_t stream = nullptr;
      ASSERT_EQ(cudaSuccess, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      fn(r, comms[r].get(), stream);
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    });
  }
  for (auto& t : threads) t.join();
  cudaDeviceSynchronize();
  for (auto& c : comms) {
    cudaFree(c->buffer);
    cudaFreeHost(c->host_error);
  }
}

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
