// moe-perf's kernel timer: the CUPTI activity collector (contract in kernel_timer.h).
//
// CUPTI attaches an external-correlation record to every CUDA runtime/driver API record created while an id is
// pushed, and every kernel record carries the correlation id of the API call that launched it. The API records are
// therefore enabled too (RUNTIME and DRIVER: NCCL launches through the driver API, the library and moe-perf through
// the runtime); their contents are ignored.
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
  std::string start_error;
  std::mutex flush_mutex;  // one forced flush at a time
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
  return st.error;
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
  if (*buffer == nullptr) KernelTimer::instance().fail("out of host memory for CUPTI activity buffers");
}

void CUPTIAPI bufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid_bytes) {
  if (buffer == nullptr) return;
  KernelTimer::instance().onBuffer(buffer, valid_bytes);
  std::free(buffer);
}

// "" when collection is on.
std::string enableCupti() {
  CUptiResult r = cuptiActivityRegisterCallbacks(bufferRequested, bufferCompleted);
  if (r != CUPTI_SUCCESS) return cuptiText("cuptiActivityRegisterCallbacks", r);
  const CUpti_ActivityKind kinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION,
                                      CUPTI_ACTIVITY_KIND_RUNTIME, CUPTI_ACTIVITY_KIND_DRIVER};
  const char* names[] = {"cuptiActivityEnable(CONCURRENT_KERNEL)", "cuptiActivityEnable(EXTERNAL_CORRELATION)",
                         "cuptiActivityEnable(RUNTIME)", "cuptiActivityEnable(DRIVER)"};
  for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); ++i) {
    r = cuptiActivityEnable(kinds[i]);
    if (r != CUPTI_SUCCESS) {
      for (size_t j = 0; j < i; ++j) cuptiActivityDisable(kinds[j]);  // best effort; the error below is what counts
      return cuptiText(names[i], r);
    }
  }
  return "";
}

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
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mutex);
  CUpti_Activity* record = nullptr;
  for (;;) {
    const CUptiResult r = cuptiActivityGetNextRecord(const_cast<uint8_t*>(buffer), valid_bytes, &record);
    if (r == CUPTI_ERROR_MAX_LIMIT_REACHED) break;  // end of the buffer
    if (r != CUPTI_SUCCESS) {
      if (st.error.empty()) st.error = cuptiText("cuptiActivityGetNextRecord", r);
      failed_.store(true);
      break;
    }
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const auto* k = reinterpret_cast<const KernelRecord*>(record);
        st.book.addKernel(k->correlationId, k->start, k->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION: {
        const auto* e = reinterpret_cast<const CUpti_ActivityExternalCorrelation*>(record);
        if (e->externalKind == kKind) st.book.addCorrelation(e->correlationId, e->externalId);
        break;
      }
      default:
        break;  // API records: only there so that CUPTI emits the external correlations
    }
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

#else  // !NCCL_MOE_PERF_HAVE_CUPTI

namespace {
const char* const kNoCupti = "moe-perf was built without CUPTI (cupti.h or libcupti not found at configure time)";
}

bool KernelTimer::start(std::string* why) {
  if (why != nullptr) *why = kNoCupti;
  fail(kNoCupti);
  return false;
}
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
