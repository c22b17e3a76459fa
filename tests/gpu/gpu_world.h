// The worlds the multi-rank GPU tests run in. A test names its rank count R (the suites instantiate R = 2, 4
// and 8) and the world is chosen from the machine:
//   one rank per GPU   when the process sees at least R GPUs: ncclCommInitAll over GPUs 0..R-1, then
//                      ncclMoeCommInit on every rank's thread (the production path, NVLink between ranks);
//   one-GPU world      otherwise, all R ranks on GPU 0 through ncclMoeCommInitAll (several ranks share the GPU
//                      and split its SMs; functional only: timings say nothing about NVLink), when the GPU has
//                      at least kMinSmsPerRank SMs per rank;
//   skipped            without a GPU, or with too few SMs (reported by ctest as skipped, never as passed).
// Ranks are threads. With ranks sharing a GPU a rank must not allocate or free device memory (cudaFree waits for
// the whole device) while a peer's collective kernel waits for this rank's next call: do allocations before
// World::barrier() and calls after it (RankSession in ht_case.h does that for every collective call).
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "harness/barrier.h"
#include "harness/device_array.h"
#include "nccl_moe.h"

namespace gpu_test {

// Ranks sharing GPU 0 put their streams on one device, and CUDA maps streams onto CUDA_DEVICE_MAX_CONNECTIONS
// hardware queues (default 8): two ranks whose streams share a queue serialise a waiting kernel behind the kernel
// it waits for (seen: back-to-back HT calls of two ranks timed out). gpu_env.cc asks for the maximum before the
// runtime initialises; World checks that it is set.
constexpr int kMaxConnections = 32;
inline int maxConnections() {
  const char* v = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
  return v != nullptr ? std::atoi(v) : 8;
}

constexpr int kMinSmsPerRank = 4;

inline int gpuCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

inline int deviceSms(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return sms;
}

enum class Placement { kOnePerGpu, kOneGpu };

inline const char* placementName(Placement p) {
  return p == Placement::kOnePerGpu ? "one rank per GPU" : "one-GPU world (ranks share GPU 0)";
}

// Where R ranks run on this machine; false (with the reason) when the test must be skipped.
inline bool choosePlacement(int ranks, Placement* placement, std::string* why) {
  const int gpus = gpuCount();
  if (gpus >= ranks) {
    *placement = Placement::kOnePerGpu;
    return true;
  }
  if (gpus < 1) {
    *why = "needs a GPU";
    return false;
  }
  if (deviceSms(0) / ranks < kMinSmsPerRank) {
    *why = std::to_string(ranks) + " ranks on one GPU of " + std::to_string(deviceSms(0)) + " SMs leave fewer than " +
           std::to_string(kMinSmsPerRank) + " SMs per rank";
    return false;
  }
  *placement = Placement::kOneGpu;
  return true;
}

// Skips the calling test (GTEST_SKIP) when R ranks cannot run here; else sets *placement.
#define GPU_WORLD_OR_SKIP(ranks, placement)                                  \
  do {                                                                       \
    std::string gpu_world_why_;                                              \
    if (!::gpu_test::choosePlacement((ranks), (placement), &gpu_world_why_)) \
      GTEST_SKIP() << (ranks) << " ranks: " << gpu_world_why_;               \
  } while (0)

// R ranks as threads of this process.
class World {
 public:
  World(int ranks, Placement placement) : n_(ranks), placement_(placement), barrier_(ranks) {
    if (placement_ == Placement::kOnePerGpu) {
      nccl_.assign(n_, nullptr);
      std::vector<int> devs(n_);
      for (int i = 0; i < n_; ++i) devs[i] = i;
      ok_ = ncclCommInitAll(nccl_.data(), n_, devs.data()) == ncclSuccess;
    } else {
      ok_ = maxConnections() >= kMaxConnections;
      EXPECT_TRUE(ok_) << "CUDA_DEVICE_MAX_CONNECTIONS is " << maxConnections() << ": ranks sharing a GPU need "
                       << kMaxConnections << " (set before CUDA initialises; gpu_env.cc does it for this binary)";
    }
    rank_sms_ = deviceSms(0) / (placement_ == Placement::kOneGpu ? n_ : 1);
  }
  ~World() {
    for (ncclComm_t c : nccl_)
      if (c != nullptr) ncclCommDestroy(c);
  }
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  bool ok() const { return ok_; }
  int size() const { return n_; }
  Placement placement() const { return placement_; }
  bool sharedGpu() const { return placement_ == Placement::kOneGpu; }
  int device(int rank) const { return placement_ == Placement::kOnePerGpu ? rank : 0; }
  // The rank's NCCL communicator (one rank per GPU only; nullptr in the one-GPU world).
  ncclComm_t nccl(int rank) const { return nccl_.empty() ? nullptr : nccl_[rank]; }
  harness::HostBarrier& barrier() { return barrier_; }
  // SMs one rank's kernels may use: HT num_sms of a test case is clamped to it.
  int rankSms() const { return rank_sms_; }
  int clampSms(int num_sms) const { return num_sms > rank_sms_ ? rank_sms_ : num_sms; }

  // fn(rank) on one thread per rank with the rank's device current. An exception leaving fn (harness::Error
  // of a device buffer) becomes a failure naming the rank.
  template <typename Fn>
  void run(Fn fn) {
    std::vector<std::thread> threads;
    for (int r = 0; r < n_; ++r) {
      threads.emplace_back([&, r] {
        if (cudaSetDevice(device(r)) != cudaSuccess) {
          ADD_FAILURE() << "rank " << r << ": cudaSetDevice(" << device(r) << ") failed";
          return;
        }
        try {
          fn(r);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "rank " << r << ": " << e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
  }

  // Every rank's MoE communicator for `config` (collectively: ncclMoeCommInit over the NCCL communicators, or
  // ncclMoeCommInitAll in the one-GPU world), then fn(rank, comm, stream) on the rank's thread with a
  // non-blocking stream of its own; the stream is synchronised and the communicator destroyed afterwards.
  template <typename Fn>
  void runWithComms(const ncclMoeConfig_t& config, Fn fn) {
    std::vector<ncclMoeComm_t> comms(n_, nullptr);
    if (sharedGpu()) {
      std::vector<int> devs(n_, 0);
      ncclMoeConfig_t c = config;
      ASSERT_EQ(ncclSuccess, ncclMoeCommInitAll(comms.data(), n_, devs.data(), &c)) << ncclMoeGetLastError(nullptr);
    }
    run([&](int r) {
      if (!sharedGpu()) {
        ncclMoeConfig_t c = config;
        ASSERT_EQ(ncclSuccess, ncclMoeCommInit(&comms[r], nccl(r), &c)) << ncclMoeGetLastError(nullptr);
      }
      cudaStream_t stream = nullptr;
      ASSERT_EQ(cudaSuccess, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      try {
        fn(r, comms[r], stream);
      } catch (const std::exception& e) {
        ADD_FAILURE() << "rank " << r << ": " << e.what();
      }
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
      EXPECT_EQ(ncclSuccess, ncclMoeCommDestroy(comms[r])) << "rank " << r << ": " << ncclMoeGetLastError(nullptr);
    });
  }

 private:
  int n_;
  Placement placement_;
  harness::HostBarrier barrier_;
  std::vector<ncclComm_t> nccl_;
  bool ok_ = false;
  int rank_sms_ = 0;
};

// The rank counts every multi-rank suite is instantiated with, and their test-name suffix.
inline std::vector<int> rankCounts() { return {2, 4, 8}; }
inline std::string ranksName(const ::testing::TestParamInfo<int>& info) { return "R" + std::to_string(info.param); }

}  // namespace gpu_test
