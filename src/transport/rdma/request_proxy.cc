#include "transport/rdma/request_proxy.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "core/error.h"
#include "core/log.h"

namespace nccl_moe::rdma {

namespace m = nccl_moe::mlx5;

namespace {
const char* opName(ProxyOp op) {
  switch (op) {
    case ProxyOp::kInvalid:
      return "invalid";
    case ProxyOp::kPut:
      return "put";
    case ProxyOp::kPutSignal:
      return "put_signal";
    case ProxyOp::kSignal:
      return "signal";
    case ProxyOp::kQuiet:
      return "quiet";
  }
  return "unknown";
}
}  // namespace

RequestProxy::RequestProxy(const ProxyRing& ring, uint32_t start, const WindowRegistry* local_windows,
                           std::vector<ProxyQp> qps, const RequestProxyConfig& config)
    : ring_(ring),
      local_windows_(local_windows),
      qps_(std::move(qps)),
      config_(config),
      consumed_(start),
      completed_(start),
      unsignaled_run_(qps_.size(), 0),
      touched_(qps_.size(), false) {
  if (config_.max_batch == 0) config_.max_batch = 1;
  if (config_.max_unsignaled == 0) config_.max_unsignaled = 1;
}

ncclResult_t RequestProxy::fail(ProxyError code, ncclResult_t result, const std::string& message) {
  if (error_code_ == ProxyError::kNone) {
    error_code_ = code;
    error_result_ = result;
    error_ = "request proxy: " + message;
    __atomic_store_n(&ring_.shared->error, static_cast<uint32_t>(code), __ATOMIC_RELEASE);
    MOE_WARN("%s", error_.c_str());
  }
  return setLastError(error_result_, "%s", error_.c_str());
}

bool RequestProxy::translate(const ProxyRequest& r, uint32_t seq, bool remote, uint32_t key, uint64_t offset,
                             uint64_t bytes, const char* what, uint64_t* addr) {
  bool ok;
  if (remote) {
    const std::vector<Window>& windows = qps_[r.qp].remote_windows;
    ok = window_translate(windows.data(), static_cast<uint32_t>(windows.size()), key, true, offset, bytes, addr);
  } else {
    ok = local_windows_->translate(key, false, offset, bytes, addr);
  }
  if (ok) return true;
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "descriptor %u (%s on QP index %u): %s key 0x%x, offset %" PRIu64 ", %" PRIu64
                " bytes: no such key, or the range leaves its window",
                seq, opName(r.op), r.qp, what, key, offset, bytes);
  fail(ProxyError::kTranslation, ncclInvalidUsage, buf);
  return false;
}

bool RequestProxy::post(const ProxyRequest& r, uint32_t seq, bool* no_room) {
  if (r.qp >= qps_.size()) {
    char buf[128];
    std::snprintf(buf, sizeof(buf), "descriptor %u (%s) names QP index %u; the ring has %zu QPs", seq, opName(r.op),
                  r.qp, qps_.size());
    fail(ProxyError::kBadDescriptor, ncclInvalidUsage, buf);
    return false;
  }
  HostSq& sq = *qps_[r.qp].sq;
  const bool has_data = r.op == ProxyOp::kPut || r.op == ProxyOp::kPutSignal;
  const bool has_signal = r.op == ProxyOp::kPutSignal || r.op == ProxyOp::kSignal;
  uint64_t local_addr = 0, remote_addr = 0, signal_addr = 0;
  if (has_data && (!translate(r, seq, false, r.local_key, r.local_offset, r.bytes, "local", &local_addr) ||
                   !translate(r, seq, true, r.remote_key, r.remote_offset, r.bytes, "remote", &remote_addr)))
    return false;
  if (has_signal && !translate(r, seq, true, r.signal_key, r.signal_offset, m::kAtomicBytes, "signal", &signal_addr))
    return false;
  const uint32_t num_wqebbs = (has_data ? 1 : 0) + (has_signal ? 1 : 0);
  if (!sq.hasRoom(num_wqebbs)) {
    *no_room = true;
    return false;
  }
  uint32_t& run = unsignaled_run_[r.qp];
  run += num_wqebbs;
  const bool signaled = run >= config_.max_unsignaled;
  if (signaled) run = 0;
  const m::LocalSge src{local_addr, r.local_key, r.bytes};
  const m::RemoteSge dst{remote_addr, r.remote_key};
  const m::RemoteSge signal{signal_addr, r.signal_key};
  bool ok = false;
  if (r.op == ProxyOp::kPut) ok = sq.postWrite(src, dst, signaled);
  if (r.op == ProxyOp::kPutSignal)
    ok = sq.postPutSignal(src, dst, signal, r.signal_add, config_.fetch_result, signaled);
  if (r.op == ProxyOp::kSignal) ok = sq.postFetchAdd(signal, r.signal_add, config_.fetch_result, signaled);
  if (!ok) {
    char buf[128];
    std::snprintf(buf, sizeof(buf), "descriptor %u (%s on QP index %u): the WQE could not be encoded", seq,
                  opName(r.op), r.qp);
    fail(ProxyError::kPost, ncclInternalError, buf);
  }
  return ok;
}

void RequestProxy::completeInFlight() {
  const uint32_t before = completed_;
  while (!in_flight_.empty()) {
    const InFlight& e = in_flight_.front();
    if (e.qp >= 0 && !proxy_index_reached(qps_[e.qp].sq->completed(), e.end_pi)) break;
    completed_ = e.seq + 1;
    in_flight_.pop_front();
  }
  if (completed_ != before) __atomic_store_n(&ring_.shared->completed, completed_, __ATOMIC_RELEASE);
}

ncclResult_t RequestProxy::progress(bool* progressed) {
  if (progressed != nullptr) *progressed = false;
  if (failed()) return setLastError(error_result_, "%s", error_.c_str());
  bool did = false;
  for (size_t i = 0; i < qps_.size(); ++i) {
    if (qps_[i].sq->poll() > 0) did = true;
    if (qps_[i].sq->failed())
      return fail(ProxyError::kCompletion, ncclRemoteError,
                  "QP index " + std::to_string(i) + ": " + qps_[i].sq->error());
  }
  const uint32_t completed_before = completed_;
  completeInFlight();

  std::fill(touched_.begin(), touched_.end(), false);
  const uint32_t consumed_before = consumed_;
  for (uint32_t n = 0; n < config_.max_batch; ++n) {
    const uint32_t seq = consumed_;
    ProxyDesc d;
    if (!proxy_load_host(&ring_.slots[proxy_slot(seq, ring_.num_slots)], seq, ring_.num_slots, &d)) {
      if (proxy_desc_overrun(d, seq, ring_.num_slots)) {
        char buf[160];
        std::snprintf(buf, sizeof(buf),
                      "the producer wrote descriptor %u over descriptor %u before it was consumed (it ignored its "
                      "credits: %u slots)",
                      seq + ring_.num_slots, seq, ring_.num_slots);
        return fail(ProxyError::kOverrun, ncclInvalidUsage, buf);
      }
      break;
    }
    ProxyRequest r;
    const ProxyDefect defect = proxy_decode(d, seq, &r);
    if (defect != ProxyDefect::kNone) {
      char buf[200];
      std::snprintf(buf, sizeof(buf), "descriptor %u: %s (qword 0 = 0x%016" PRIx64 ")", seq, proxy_defect_text(defect),
                    d.q[0]);
      return fail(ProxyError::kBadDescriptor, ncclInvalidUsage, buf);
    }
    if (r.op == ProxyOp::kQuiet) {
      in_flight_.push_back({seq, -1, 0});
      ++consumed_;
      break;  // end the batch: everything before the quiet gets its CQE request and doorbell now
    }
    bool no_room = false;
    if (!post(r, seq, &no_room)) {
      if (failed()) return error_result_;
      break;  // the SQ is full: retry this descriptor after completions
    }
    in_flight_.push_back({seq, r.qp, qps_[r.qp].sq->pi()});
    touched_[r.qp] = true;
    ++consumed_;
    ++num_posted_;
  }
  if (consumed_ != consumed_before) {
    // The descriptors are copied out: their slots are the producer's again.
    __atomic_store_n(&ring_.shared->consumed, consumed_, __ATOMIC_RELEASE);
    did = true;
  }
  for (size_t i = 0; i < qps_.size(); ++i) {
    if (!touched_[i]) continue;
    qps_[i].sq->signalLast();
    unsignaled_run_[i] = 0;
    qps_[i].sq->ringDoorbell();
  }
  completeInFlight();
  if (completed_ != completed_before) did = true;
  if (progressed != nullptr) *progressed = did;
  return ncclSuccess;
}

}  // namespace nccl_moe::rdma
