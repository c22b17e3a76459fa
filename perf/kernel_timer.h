// moe-perf's kernel timer: per-call GPU kernel time from CUPTI activity records, the way torch's profiler (kineto)
// and hence DeepEP's tests measure kernels (the performance rules: "LL: time = median kernel time").
//
// Contract
//   - A timed call is bracketed on its host thread by push(id) / pop(id) with a fresh id from nextId(). Every kernel
//     launched by that thread in between (by the MoE library, NCCL or moe-perf itself, on any stream) is attributed
//     to the id through CUPTI's external correlation (kind CUSTOM0): CUPTI keeps one stack per host thread, so
//     several rank threads of one process can time their calls at the same time.
//   - The time of a call ("span") = last kernel end - first kernel start over the kernels attributed to its id, in
//     microseconds. Gaps between the kernels of one call count; the launch gap before the first kernel does not.
//     Only kernels count (CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, which does not serialise kernels); memcpy/memset
//     operations of a call are not part of its span.
//   - collect(ids) delivers CUPTI's buffers (forced flush) and returns the span of every id, or a reason when an id
//     has no complete kernel record. The caller must make sure that no kernel launched under a timer id is still
//     running anywhere in the process (its own stream synchronised, other rank threads at a host barrier): a
//     forced flush delivers unfinished records without timestamps.
//   - Any CUPTI failure (library missing at build time, an initialisation error, insufficient privileges, dropped
//     records) makes the timer unusable with the CUPTI error text; moe-perf then times with CUDA events and says so.
//   - KernelSpanBook is the pure bookkeeping (records in, spans out), without CUPTI, unit-tested on the CPU
//     (tests/unit/perf_kernel_timer_test.cc); it is not thread-safe (KernelTimer serialises access to it).
//   - KernelTimer is process-wide (instance(), never destroyed); CUPTI's buffer-completed callbacks run on a CUPTI
//     thread or inside a flush on the calling thread, parse their buffer without any lock of ours (no CUPTI call is
//     ever made while the book's mutex is held) and then feed the book under that mutex. Forced flushes are
//     serialised process-wide. Built without CUPTI (NCCL_MOE_PERF_HAVE_CUPTI undefined), start() fails with a
//     message and nothing else is ever called.
//   - stop() (once every thread that timed calls is done) delivers the last buffers and disables collection, so no
//     CUPTI callback and no API tracing runs while the process exits.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <iterator>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

namespace nccl_moe::perf {

class KernelSpanBook {
 public:
  // A kernel record (CUPTI correlation id of the API call that launched it, timestamps in ns). A record whose
  // timestamps are missing (0) or reversed is incomplete: its id is then reported as missing.
  void addKernel(uint32_t correlation, uint64_t start_ns, uint64_t end_ns) {
    const Interval k{start_ns, end_ns};
    const auto it = corr_to_ext_.find(correlation);
    if (it != corr_to_ext_.end()) {
      fold(it->second, k);
    } else {
      pending_[correlation].push_back(PendingKernel{k, generation_});
    }
  }

  // An external-correlation record: the API call `correlation` ran while `external_id` was pushed. Records may
  // arrive in any order relative to the kernel records of the same call.
  void addCorrelation(uint32_t correlation, uint64_t external_id) {
    corr_to_ext_[correlation] = external_id;
    ext_to_corrs_[external_id].push_back(correlation);
    const auto it = pending_.find(correlation);
    if (it == pending_.end()) return;
    for (const PendingKernel& p : it->second) fold(external_id, p.k);
    pending_.erase(it);
  }

  // Called after each complete delivery of the buffers (a flush). Kernel records that are still unattributed two
  // flushes after they arrived belong to calls outside any timer id (barriers, hold kernels) and are dropped, so
  // memory stays bounded.
  void endFlush() {
    ++generation_;
    for (auto it = pending_.begin(); it != pending_.end();) {
      auto& v = it->second;
      v.erase(std::remove_if(v.begin(), v.end(),
                             [this](const PendingKernel& p) { return p.generation + 2 <= generation_; }),
              v.end());
      it = v.empty() ? pending_.erase(it) : std::next(it);
    }
  }

  // The span of each id in microseconds (same order as `ids`), -1 for an id without complete kernel records; those
  // ids are appended to *missing (when not null). Taken ids are forgotten (a late record for them is dropped).
  std::vector<double> take(const std::vector<uint64_t>& ids, std::vector<uint64_t>* missing) {
    std::vector<double> out(ids.size(), -1.0);
    for (size_t i = 0; i < ids.size(); ++i) {
      const uint64_t id = ids[i];
      const auto it = spans_.find(id);
      if (it != spans_.end() && it->second.count > 0 && !it->second.broken) {
        out[i] = static_cast<double>(it->second.end - it->second.start) * 1e-3;
      } else if (missing != nullptr) {
        missing->push_back(id);
      }
      if (it != spans_.end()) spans_.erase(it);
      const auto corrs = ext_to_corrs_.find(id);
      if (corrs != ext_to_corrs_.end()) {
        for (uint32_t c : corrs->second) corr_to_ext_.erase(c);
        ext_to_corrs_.erase(corrs);
      }
    }
    return out;
  }

  // Kernels of ids not taken yet (for the tests and diagnostics).
  int64_t kernelsOf(uint64_t id) const {
    const auto it = spans_.find(id);
    return it == spans_.end() ? 0 : it->second.count;
  }
  size_t pendingKernels() const {
    size_t n = 0;
    for (const auto& kv : pending_) n += kv.second.size();
    return n;
  }
  size_t knownCorrelations() const { return corr_to_ext_.size(); }

 private:
  struct Interval {
    uint64_t start, end;
  };
  struct PendingKernel {
    Interval k;
    uint64_t generation;
  };
  struct Span {
    uint64_t start = std::numeric_limits<uint64_t>::max();
    uint64_t end = 0;
    int64_t count = 0;
    bool broken = false;  // an incomplete record was attributed to the id
  };
  void fold(uint64_t id, const Interval& k) {
    Span& s = spans_[id];
    if (k.start == 0 || k.end == 0 || k.end < k.start) {
      s.broken = true;
      return;
    }
    s.start = std::min(s.start, k.start);
    s.end = std::max(s.end, k.end);
    ++s.count;
  }

  std::unordered_map<uint32_t, uint64_t> corr_to_ext_;
  std::unordered_map<uint64_t, std::vector<uint32_t>> ext_to_corrs_;
  std::unordered_map<uint32_t, std::vector<PendingKernel>> pending_;
  std::unordered_map<uint64_t, Span> spans_;
  uint64_t generation_ = 0;
};

class KernelTimer {
 public:
  static KernelTimer& instance();  // process-wide, never destroyed (CUPTI may call back until the process ends)

  // Enables CUPTI activity collection (once; later calls return the first result). False with *why = the reason
  // (CUPTI error text) when the timer cannot be used.
  bool start(std::string* why);
  // start() succeeded and no failure (dropped records, CUPTI errors) was seen since.
  bool usable() const { return started_.load() && !failed_.load(); }
  std::string error() const;

  uint64_t nextId() { return next_id_.fetch_add(1) + 1; }
  // Bracket a timed call on the calling thread. False (and the timer becomes unusable) on a CUPTI error.
  bool push(uint64_t id);
  bool pop(uint64_t id);

  // Delivers all records (forced flush; see the contract above for the caller's duty) and returns one span per id
  // in *spans_us (-1 where missing). False with *error when the timer failed or any id has no complete record.
  bool collect(const std::vector<uint64_t>& ids, std::vector<double>* spans_us, std::string* error);

  // Flushes and disables CUPTI collection (idempotent; no-op when start() failed). The timer is unusable after.
  void stop();

  // Buffer callbacks (called by CUPTI; public for the C callback trampolines only).
  void onBuffer(const uint8_t* buffer, size_t valid_bytes);
  void fail(const std::string& why);
  // fail() without taking any lock, for CUPTI's buffer-request callback (CUPTI may hold its own locks there);
  // `why` must be a string literal (error() reports it when no other reason was recorded).
  void failFromCallback(const char* why);

 private:
  KernelTimer() = default;
  std::atomic<bool> started_{false};
  std::atomic<bool> failed_{false};
  std::atomic<uint64_t> next_id_{0};
  std::atomic<const char*> callback_error_{nullptr};
};

// RAII push/pop around one timed call; does nothing when `timer` is null or `ids` is null (untimed iteration).
class KernelTimerScope {
 public:
  KernelTimerScope(KernelTimer* timer, std::vector<uint64_t>* ids) : timer_(timer) {
    if (timer_ == nullptr || ids == nullptr) {
      timer_ = nullptr;
      return;
    }
    id_ = timer_->nextId();
    ids->push_back(id_);
    if (!timer_->push(id_)) timer_ = nullptr;
  }
  ~KernelTimerScope() {
    if (timer_ != nullptr) timer_->pop(id_);
  }
  KernelTimerScope(const KernelTimerScope&) = delete;
  KernelTimerScope& operator=(const KernelTimerScope&) = delete;

 private:
  KernelTimer* timer_;
  uint64_t id_ = 0;
};

}  // namespace nccl_moe::perf
