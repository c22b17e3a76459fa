// What a moe-perf run is doing, for the watchdog and for the progress lines on stderr (docs/moe-perf.md,
// "Progress"). Pure host code (no CUDA), unit-tested in tests/unit/perf_progress_test.cc.
//
// Contract
//   - Progress is one rank's (or the CPU backend's) current step, written by that rank's thread only and read by
//     other threads (the GPU watchdog, the ProgressPrinter) through atomics. A reader may see the fields of two
//     consecutive updates mixed: the line it prints is then one step stale, never wrong in a way that matters.
//     `phase` must point to a string with static storage (a literal).
//   - ProgressLimiter decides when a line may be printed: never before `first_after_s` of the run, then at most once
//     per `interval_s`. It takes the elapsed time as an argument, so it is testable without a clock.
//   - formatProgressLine() turns a snapshot into one line (no trailing newline): elapsed time, mode, dtype, tokens,
//     SM budget (HT), the problem's place in the sweep and its own elapsed time, the phase and, in a loop of calls,
//     "warm-up call k/w" or "timed call k/n".
//   - ProgressPrinter is a thread that polls one Progress every 200 ms and writes the lines the limiter allows to
//     stderr (one fprintf per line). Only stderr: stdout (the table) is byte-identical with or without it. It is
//     created by the process that holds global rank 0 only (GPU: that rank's Progress; CPU: the backend's), and not
//     at all with -q/--quiet.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include "options.h"

namespace nccl_moe::perf {

// Nanoseconds of the steady clock.
inline int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A copy of a Progress at one instant, for formatting.
struct ProgressSnapshot {
  const char* phase = "";
  int mode = -1;   // Mode, -1 = no problem yet
  int dtype = -1;  // DType
  int sms = -1;    // HT SM budget of the current run, 0 = library default, -1 = none (LL, CPU)
  int64_t tokens = 0;
  int problem_idx = 0;   // 1-based place of the current (mode, dtype, tokens) problem in the run
  int num_problems = 0;  // problems in the run (countProblems)
  double problem_s = 0;  // seconds since the current problem started
  int call = 0;          // 0-based call of the current loop
  int warmup = 0;        // warm-up calls of the loop
  int iters = 0;         // timed calls of the loop; 0 = the phase is not a loop of calls
};

// One rank's (or the CPU backend's) current step.
struct Progress {
  std::atomic<int64_t> last_ns{0};             // when the rank last reported (the watchdog's clock)
  std::atomic<const char*> phase{"starting"};  // a string literal
  std::atomic<bool> finished{false};
  std::atomic<int> mode{-1}, dtype{-1}, sms{-1};
  std::atomic<int64_t> tokens{0};
  std::atomic<int> problem_idx{0}, num_problems{0};
  std::atomic<int64_t> problem_start_ns{0};
  std::atomic<int> call{0}, warmup{0}, iters{0};

  // A step that is not a loop of calls.
  void set(const char* what) { setCall(what, 0, 0, 0); }
  // Call `call` (0-based) of a loop of `warmup` untimed then `iters` timed calls.
  void setCall(const char* what, int call_idx, int num_warmup, int num_iters);
  // The rank starts problem `idx` (1-based) of `num` of the run.
  void enterProblem(Mode m, DType d, int64_t num_tokens, int idx, int num);
  // The HT SM budget of the runs that follow (-1: none).
  void setSms(int num_sms) { sms.store(num_sms); }
  ProgressSnapshot snapshot(int64_t now_ns) const;
};

// (mode, dtype, tokens) problems of a run: the sum over its modes of dtypes x token sizes.
int countProblems(const Options& options);

class ProgressLimiter {
 public:
  explicit ProgressLimiter(double first_after_s = 3.0, double interval_s = 2.0)
      : first_after_s_(first_after_s), interval_s_(interval_s) {}
  // True when a line may be printed at `elapsed_s` (seconds since the run started); a true answer counts as printed.
  bool due(double elapsed_s);

 private:
  double first_after_s_, interval_s_;
  double last_s_ = -1;  // when the last line was allowed; < 0 = none yet
};

// "moe-perf: [  12.3 s] ht bf16, 4096 tokens, sms 24 (problem 2/3, 4.1 s): ht: timed dispatch/combine, timed call
// 7/20" (one line, no newline).
std::string formatProgressLine(const ProgressSnapshot& s, double elapsed_s);

// Polls `progress` every 200 ms on its own thread and prints the lines `limiter` allows to `sink` (stderr). The
// run's clock starts at construction. Stops (and joins) in the destructor.
class ProgressPrinter {
 public:
  ProgressPrinter(const Progress& progress, ProgressLimiter limiter = ProgressLimiter(), std::FILE* sink = stderr);
  ~ProgressPrinter();
  ProgressPrinter(const ProgressPrinter&) = delete;
  ProgressPrinter& operator=(const ProgressPrinter&) = delete;

 private:
  void loop();
  const Progress& progress_;
  ProgressLimiter limiter_;
  std::FILE* sink_;
  const int64_t start_ns_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace nccl_moe::perf
