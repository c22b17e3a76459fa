#include "transport/rdma/host_sq.h"

#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "transport/rdma/host_wait.h"

namespace nccl_moe::rdma {

namespace m = nccl_moe::mlx5;

HostSq::HostSq(const SqView& sq, const CqView& cq) : sq_(sq), cq_(cq), wqebbs_(sq.wqe_cnt, 1) {}

void HostSq::advance(uint32_t ds) {
  const uint32_t n = m::wqebbs_for_ds(ds);
  wqebbs_[m::sq_slot(pi_, sq_.wqe_cnt)] = static_cast<uint8_t>(n);
  last_wqe_pi_ = pi_;
  has_unannounced_ = true;
  pi_ += n;
}

bool HostSq::postNop(bool signaled) {
  if (!hasRoom(1)) return false;
  advance(m::build_nop(slot(pi_), m::WqeCtrl{pi_, sq_.qpn, signaled, m::FenceMode::kNone}));
  return true;
}

bool HostSq::postWrite(const m::LocalSge& src, const m::RemoteSge& dst, bool signaled, m::FenceMode fence) {
  if (!hasRoom(1)) return false;
  const uint32_t ds = m::build_write(slot(pi_), m::WriteWqe{m::WqeCtrl{pi_, sq_.qpn, signaled, fence}, src, dst});
  if (ds == 0) return false;
  advance(ds);
  return true;
}

bool HostSq::postWriteInline(const void* data, uint32_t bytes, const m::RemoteSge& dst, bool signaled) {
  if (!hasRoom(1)) return false;
  const uint32_t ds = m::build_write_inline(
      slot(pi_), m::InlineWriteWqe{m::WqeCtrl{pi_, sq_.qpn, signaled, m::FenceMode::kNone}, data, bytes, dst});
  if (ds == 0) return false;
  advance(ds);
  return true;
}

bool HostSq::postFetchAdd(const m::RemoteSge& target, uint64_t add, const m::LocalWord& result, bool signaled,
                          m::FenceMode fence) {
  if (!hasRoom(1)) return false;
  advance(
      m::build_fetch_add(slot(pi_), m::FetchAddWqe{m::WqeCtrl{pi_, sq_.qpn, signaled, fence}, target, add, result}));
  return true;
}

bool HostSq::postPutSignal(const m::LocalSge& src, const m::RemoteSge& dst, const m::RemoteSge& signal, uint64_t add,
                           const m::LocalWord& result, bool signaled) {
  if (!hasRoom(2)) return false;
  const m::PutSignal op{pi_, sq_.qpn, src, dst, signal, add, result, signaled};
  if (m::build_put_signal(m::SqRing{sq_.buf, sq_.wqe_cnt}, op) == 0) return false;
  advance(m::kWriteDs);
  advance(m::kAtomicDs);
  return true;
}

bool HostSq::postRawWqebb(const uint8_t* wqebb) {
  if (!hasRoom(1)) return false;
  std::memcpy(slot(pi_), wqebb, m::kWqebbBytes);
  advance(1);
  return true;
}

void HostSq::skip(uint32_t num_wqebbs) {
  for (uint32_t i = 0; i < num_wqebbs; ++i) wqebbs_[m::sq_slot(pi_ + i, sq_.wqe_cnt)] = 1;
  pi_ += num_wqebbs;
}

void HostSq::signalLast() {
  if (!has_unannounced_) return;
  slot(last_wqe_pi_)[offsetof(m::CtrlSeg, fm_ce_se)] |= m::kCtrlCqUpdate;
}

void HostSq::ringDoorbell() { ringDoorbellAt(pi_); }

void HostSq::ringDoorbellAt(uint32_t pi) {
  // Release: the WQE bytes written before are visible to whoever observes either store.
  if (sq_.dbrec != nullptr) __atomic_store_n(&sq_.dbrec[m::kSendDbrIndex], m::sq_dbr_value(pi).raw, __ATOMIC_RELEASE);
  __atomic_store_n(sq_.doorbell, m::sq_doorbell_word(pi, sq_.qpn), __ATOMIC_RELEASE);
  posted_ = pi;
  has_unannounced_ = false;
}

int HostSq::poll(std::vector<Completion>* out) {
  int n = 0;
  for (;;) {
    const uint8_t* entry = cq_.buf + static_cast<size_t>(m::cq_slot(cq_ci_, cq_.cqe_cnt)) * m::kCqeBytes;
    const uint8_t op_own = __atomic_load_n(entry + m::kCqeBytes - 1, __ATOMIC_ACQUIRE);
    if (!m::cqe_is_ready(op_own, cq_ci_, cq_.cqe_cnt)) break;
    alignas(16) uint8_t copy[m::kCqeBytes];
    std::memcpy(copy, entry, m::kCqeBytes);
    Completion c{};
    c.status = m::decode_cqe(copy, cq_ci_, cq_.cqe_cnt, &c.info);
    c.pi = m::unwrap_wqe_index(completed_, c.info.wqe_counter);
    ++cq_ci_;
    ++n;
    if (c.info.qpn != sq_.qpn && !failed_) {
      failed_ = true;
      first_error_ = c;
      char buf[160];
      std::snprintf(buf, sizeof(buf), "QP 0x%x: its CQ holds a CQE of QPN 0x%x (CQE %u)", sq_.qpn, c.info.qpn,
                    cq_ci_ - 1);
      error_ = buf;
    } else {
      completed_ = c.pi + wqebbs_[m::sq_slot(c.pi, sq_.wqe_cnt)];
    }
    if (c.status != m::CqeStatus::kSuccess && !failed_) {
      failed_ = true;
      first_error_ = c;
      char buf[320];
      std::snprintf(buf, sizeof(buf), "QP 0x%x: WQE %u (%s) completed with %s: syndrome 0x%02x (%s), vendor 0x%02x",
                    sq_.qpn, c.pi, m::wqe_opcode_name(c.info.wqe_opcode),
                    c.status == m::CqeStatus::kError ? "an error" : "an unexpected CQE", c.info.syndrome,
                    m::cqe_syndrome_text(c.info.syndrome), c.info.vendor_syndrome);
      error_ = buf;
    }
    if (out != nullptr) out->push_back(c);
  }
  if (n > 0 && cq_.dbrec != nullptr)
    __atomic_store_n(&cq_.dbrec[m::kCqSetCiDbrIndex], m::cq_ci_dbr_value(cq_ci_).raw, __ATOMIC_RELEASE);
  return n;
}

ncclResult_t HostSq::waitCompleted(uint32_t target, double timeout_s, const std::function<void()>& progress) {
  Deadline deadline(timeout_s);
  Backoff backoff;
  for (;;) {
    if (poll() > 0) backoff.reset();
    if (failed_) return setLastError(ncclRemoteError, "%s", error_.c_str());
    if (static_cast<int32_t>(completed_ - target) >= 0) return ncclSuccess;
    if (deadline.expired())
      return setLastError(ncclSystemError,
                          "QP 0x%x: gave up after %.3f s waiting for completion of WQEBBs < %u (completed %u, "
                          "announced %u, written %u)",
                          sq_.qpn, timeout_s, target, completed_, posted_, pi_);
    if (progress) {
      progress();
    } else {
      backoff.pause();
    }
  }
}

ncclResult_t HostSq::waitRoom(uint32_t num_wqebbs, double timeout_s, const std::function<void()>& progress) {
  if (num_wqebbs > sq_.wqe_cnt)
    return setLastError(ncclInvalidArgument, "QP 0x%x: %u WQEBBs never fit a ring of %u", sq_.qpn, num_wqebbs,
                        sq_.wqe_cnt);
  return waitCompleted(pi_ + num_wqebbs - sq_.wqe_cnt, timeout_s, progress);
}

}  // namespace nccl_moe::rdma
