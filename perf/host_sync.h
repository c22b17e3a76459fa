// Host-side synchronisation between the threads of one process (rank threads, CPU-mode rank team).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace nccl_moe::perf {

// Reusable barrier for a fixed number of threads (std::barrier is C++20).
class HostBarrier {
 public:
  explicit HostBarrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t gen = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != gen; });
  }

 private:
  const int count_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int waiting_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace nccl_moe::perf
