// Bounded host waits for the transport's CPU threads (request proxy, software NIC executor, host posters): a
// deadline, and a backoff that spins briefly, then yields, then sleeps, so that a thread polling host memory
// never starves the thread it waits for on a machine with few cores (CI runs on 2).
#pragma once

#include <sys/prctl.h>

#include <chrono>
#include <cstdint>
#include <thread>

namespace nccl_moe::rdma {

class Deadline {
 public:
  explicit Deadline(double seconds)
      : end_(std::chrono::steady_clock::now() +
             std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds))) {}
  bool expired() const { return std::chrono::steady_clock::now() >= end_; }

 private:
  std::chrono::steady_clock::time_point end_;
};

// Lets the calling thread's short sleeps last about as long as asked: Linux rounds them up by the thread's timer
// slack (50 us by default), which would make every microsecond-scale backoff or chaos delay 50 us. Only for
// threads the transport owns (executor, proxy) and tests; it changes nothing else.
inline void usePreciseSleeps() { prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); }

// Call pause() after each poll that found nothing, reset() after one that found work.
class Backoff {
 public:
  static constexpr uint32_t kSpins = 16;
  static constexpr uint32_t kYields = 64;
  static constexpr uint32_t kMaxSleepUs = 100;

  void reset() {
    idle_ = 0;
    sleep_us_ = 1;
  }
  void pause() {
    ++idle_;
    if (idle_ <= kSpins) return;
    if (idle_ <= kSpins + kYields) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(sleep_us_));
    if (sleep_us_ < kMaxSleepUs) sleep_us_ = sleep_us_ * 2 > kMaxSleepUs ? kMaxSleepUs : sleep_us_ * 2;
  }

 private:
  uint32_t idle_ = 0;
  uint32_t sleep_us_ = 1;
};

}  // namespace nccl_moe::rdma
