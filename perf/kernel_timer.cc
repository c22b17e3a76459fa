// moe-perf's kernel timer: the CUPTI activity collector (contract in kernel_timer.h).
//
// CUPTI attaches an external-correlation record to every CUDA runtime/driver API record created while an id is
// pushed, and every kernel record carries the correlation id of the API call that launched it. The API records are
// therefore enabled too (RUNTIME and DRIVER: NCCL launches through the driver API, the library and moe-perf through
// the runtime); their contents are ignored. They cannot be left off: cupti_activity.h (CUDA 13.0, CUPTI_API_VERSION
// 130001, cuptiActivityPushExternalCorrelationId) says the external-correlation record is emitted when "a CUPTI
// activity API record is created while within an external API region", preceding that API record.
//
// Locking: CUPTI may call bufferRequested/bufferCompleted while holding locks of its own, from its worker thread or
// from a flush on the calling thread. So no CUPTI function is called while State::mutex is held (onBuffer parses
// the buffer into a local list first), and bufferRequested takes no lock at all (failFromCallback).
#include "kernel_timer.h"

#include <cstdlib>
#include <mutex>

#if defined(NCCL_MOE_PERF_HAVE_CUPTI)
#include <cupti.h>
#endif

namespace nccl_moe::perf {

namespace {

struct State {
  std::mutex mutex;  // book, error
  KernelSpanBook book;
  std::string error;
  std::mutex start_mutex;  // the start_* fields
  bool start_done = false;
  bool start_ok = false;
  bool stopped = false;
  std::string start_error;
  std::mutex flush_mutex;  // one forced flush (or stop) at a time, process-wide
};

State& state() {
  static State* s = new State();  // never destroyed: CUPTI's thread may deliver buffers during exit
  return *s;
}

}  // namespace

KernelTimer& KernelTimer::instance() {
  static KernelTimer* t = new KernelTimer();
  return *t;
}

std::string KernelTimer::error() const {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  if (st.error.empty()) {
    const char* cb = callback_error_.load();
    if (cb != nullptr) return cb;
  }
  return st.error;
}

void KernelTimer::failFromCallback(const char* why) {
  const char* expected = nullptr;
  callback_error_.compare_exchange_strong(expected, why);
  failed_.store(true);
}

void KernelTimer::fail(const std::string& why) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  if (st.error.empty()) st.error = why;
  failed_.store(true);
}

#if defined(NCCL_MOE_PERF_HAVE_CUPTI)

namespace {

constexpr size_t kBufferBytes = size_t{8} << 20;  // CUPTI asks for more buffers as it needs them
constexpr CUpti_ExternalCorrelationKind kKind = CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM0;

// The newest kernel record layout of the headers. moe-perf reads only kind, start, end and correlationId, which sit
// at the same offsets in every layout since CUpti_ActivityKernel4.
#if CUPTI_API_VERSION >= 130000
using KernelRecord = CUpti_ActivityKernel10;
#else
using KernelRecord = CUpti_ActivityKernel9;
#endif

std::string errorOr(const KernelTimer* t, const char* fallback) {
  const std::string e = t->error();
  return e.empty() ? fallback : e;
}

std::string cuptiText(const char* call, CUptiResult r) {
  const char* text = nullptr;
  if (cuptiGetResultString(r, &text) != CUPTI_SUCCESS || text == nullptr) text = "unknown CUPTI error";
  return std::string(call) + " failed: " + text + " (CUptiResult " + std::to_string(static_cast<int>(r)) + ")";
}

void CUPTIAPI bufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
  if (*buffer == nullptr) KernelTimer::instance().failFromCallback("out of host memory for CUPTI activity buffers");
}

// Each buffer CUPTI hands back is freed here, exactly once (CUPTI returns every buffer it requested once).
void CUPTIAPI bufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid_bytes) {
  if (buffer == nullptr) return;
  KernelTimer::instance().onBuffer(buffer, valid_bytes);
  std::free(buffer);
}

const CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION,
                                     CUPTI_ACTIVITY_KIND_RUNTIME, CUPTI_ACTIVITY_KIND_DRIVER};
constexpr size_t kNumKinds = sizeof(kKinds) / sizeof(kKinds[0]);

// "" when collection is on.
std::string enableCupti() {
  CUptiResult r = cuptiActivityRegisterCallbacks(bufferRequested, bufferCompleted);
  if (r != CUPTI_SUCCESS) return cuptiText("cuptiActivityRegisterCallbacks", r);
  const char* names[kNumKinds] = {"cuptiActivityEnable(CONCURRENT_KERNEL)", "cuptiActivityEnable(EXTERNAL_CORRELATION)",
                                  "cuptiActivityEnable(RUNTIME)", "cuptiActivityEnable(DRIVER)"};
  for (size_t i = 0; i < kNumKinds; ++i) {
    r = cuptiActivityEnable(kKinds[i]);
    if (r != CUPTI_SUCCESS) {
      for (size_t j = 0; j < i; ++j) cuptiActivityDisable(kKinds[j]);  // best effort; the error below is what counts
      return cuptiText(names[i], r);
    }
  }
  return "";
}

// What onBuffer extracts from one buffer before it touches the book.
struct KernelRow {
  uint32_t correlation;
  uint64_t start, end;
};
struct CorrelationRow {
  uint32_t correlation;
  uint64_t external_id;
};

}  // namespace

bool KernelTimer::start(std::string* why) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.start_mutex);
  if (!st.start_done) {
    st.start_done = true;
    st.start_error = enableCupti();
    st.start_ok = st.start_error.empty();
    if (st.start_ok) {
      started_.store(true);
    } else {
      fail(st.start_error);
    }
  }
  if (!st.start_ok && why != nullptr) *why = st.start_error;
  return st.start_ok;
}

bool KernelTimer::push(uint64_t id) {
  const CUptiResult r = cuptiActivityPushExternalCorrelationId(kKind, id);
  if (r == CUPTI_SUCCESS) return true;
  fail(cuptiText("cuptiActivityPushExternalCorrelationId", r));
  return false;
}

bool KernelTimer::pop(uint64_t id) {
  uint64_t last = 0;
  const CUptiResult r = cuptiActivityPopExternalCorrelationId(kKind, &last);
  if (r != CUPTI_SUCCESS) {
    fail(cuptiText("cuptiActivityPopExternalCorrelationId", r));
    return false;
  }
  if (last != id) {
    fail("cuptiActivityPopExternalCorrelationId returned id " + std::to_string(last) + ", expected " +
         std::to_string(id));
    return false;
  }
  return true;
}

void KernelTimer::onBuffer(const uint8_t* buffer, size_t valid_bytes) {
  // Parse first, without our lock (see the locking note at the top).
  std::vector<KernelRow> kernels;
  std::vector<CorrelationRow> correlations;
  std::string parse_error;
  CUpti_Activity* record = nullptr;
  for (;;) {
    const CUptiResult r = cuptiActivityGetNextRecord(const_cast<uint8_t*>(buffer), valid_bytes, &record);
    if (r == CUPTI_ERROR_MAX_LIMIT_REACHED) break;  // end of the buffer
    if (r != CUPTI_SUCCESS) {
      parse_error = cuptiText("cuptiActivityGetNextRecord", r);
      if (r == CUPTI_ERROR_INVALID_KIND) parse_error += " (an incomplete or invalid record: a kernel still running?)";
      break;
    }
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const auto* k = reinterpret_cast<const KernelRecord*>(record);
        kernels.push_back(KernelRow{k->correlationId, k->start, k->end});
        break;
      }
      case CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION: {
        const auto* e = reinterpret_cast<const CUpti_ActivityExternalCorrelation*>(record);
        if (e->externalKind == kKind) correlations.push_back(CorrelationRow{e->correlationId, e->externalId});
        break;
      }
      default:
        break;  // API records: only there so that CUPTI emits the external correlations
    }
  }
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  for (const CorrelationRow& c : correlations) st.book.addCorrelation(c.correlation, c.external_id);
  for (const KernelRow& k : kernels) st.book.addKernel(k.correlation, k.start, k.end);
  if (!parse_error.empty()) {
    if (st.error.empty()) st.error = parse_error;
    failed_.store(true);
  }
}

bool KernelTimer::collect(const std::vector<uint64_t>& ids, std::vector<double>* spans_us, std::string* error) {
  State& st = state();
  spans_us->assign(ids.size(), -1.0);
  if (!started_.load()) {
    *error = errorOr(this, "the kernel timer was not started");
    return false;
  }
  {
    std::lock_guard<std::mutex> flush(st.flush_mutex);
    if (st.stopped) {
      *error = "the kernel timer was stopped";
      return false;
    }
    CUptiResult r = cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    if (r != CUPTI_SUCCESS) fail(cuptiText("cuptiActivityFlushAll", r));
    size_t dropped = 0;
    r = cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped);
    if (r != CUPTI_SUCCESS) {
      fail(cuptiText("cuptiActivityGetNumDroppedRecords", r));
    } else if (dropped > 0) {
      fail("CUPTI dropped " + std::to_string(dropped) + " activity records (no buffer space)");
    }
    std::lock_guard<std::mutex> lock(st.mutex);
    st.book.endFlush();
  }
  std::vector<uint64_t> missing;
  std::lock_guard<std::mutex> lock(st.mutex);
  *spans_us = st.book.take(ids, &missing);  // always taken, so the book forgets these ids
  if (failed_.load()) {
    *error = st.error;
    spans_us->assign(ids.size(), -1.0);
    return false;
  }
  if (!missing.empty()) {
    *error = "no complete CUPTI kernel record for " + std::to_string(missing.size()) + " of " +
             std::to_string(ids.size()) + " timed calls";
    return false;
  }
  return true;
}

void KernelTimer::stop() {
  State& st = state();
  {
    std::lock_guard<std::mutex> lock(st.start_mutex);
    if (!st.start_ok) return;
  }
  std::lock_guard<std::mutex> flush(st.flush_mutex);
  if (st.stopped) return;
  st.stopped = true;
  // Deliver what is left (and free those buffers), then stop tracing; no cuptiFinalize (detaching CUPTI at run time
  // is not needed here and has been seen to crash in some CUPTI versions).
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  for (size_t i = kNumKinds; i-- > 0;) cuptiActivityDisable(kKinds[i]);
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  fail("the kernel timer was stopped");
}

#else  // !NCCL_MOE_PERF_HAVE_CUPTI

namespace {
const char* const kNoCupti = "moe-perf was built without CUPTI (cupti.h or libcupti not found at configure time)";
}

bool KernelTimer::start(std::string* why) {
  if (why != nullptr) *why = kNoCupti;
  fail(kNoCupti);
  return false;
}
void KernelTimer::stop() {}
bool KernelTimer::push(uint64_t) { return false; }
bool KernelTimer::pop(uint64_t) { return false; }
void KernelTimer::onBuffer(const uint8_t*, size_t) {}
bool KernelTimer::collect(const std::vector<uint64_t>& ids, std::vector<double>* spans_us, std::string* error) {
  spans_us->assign(ids.size(), -1.0);
  *error = kNoCupti;
  return false;
}

#endif  // NCCL_MOE_PERF_HAVE_CUPTI

}  // namespace nccl_moe::perf
