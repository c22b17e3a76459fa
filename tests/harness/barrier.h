// Host barrier between the rank threads of one process (tests and moe-perf). Bounded: wait() gives up after
// `timeout_s` and returns false, so a rank that died early cannot hang the others forever.
//
// Call it after a rank's allocations and before its first collective kernel when ranks share a GPU: an allocation
// (cudaMalloc, cudaHostAlloc, ...) may wait for the device, and a rank whose kernel already spins on a peer that
// is still allocating would deadlock until the device wait times out.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace harness {

class HostBarrier {
 public:
  explicit HostBarrier(int count) : count_(count) {}
  HostBarrier(const HostBarrier&) = delete;
  HostBarrier& operator=(const HostBarrier&) = delete;

  bool wait(double timeout_s = 120.0) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t gen = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return true;
    }
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return generation_ != gen; });
  }
  int count() const { return count_; }

 private:
  const int count_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int waiting_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace harness
