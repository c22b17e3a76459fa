// A CPU producer on one mlx5 send queue and poller of its CQ: what the request proxy posts through, and what
// the tests use to drive the software NIC the way the GPU's IBGDA code will (same builders, same doorbell record
// and doorbell values, same CQE decoding). Single-threaded: one thread owns a HostSq.
//
// Indices are free-running 32-bit WQEBB counts (mlx5/ring.h): WQEs [completed(), pi()) are in flight,
// [posted(), pi()) are written but not yet announced by a doorbell. A CQE with 16-bit counter c retires every
// WQEBB up to and including WQE c's (RC completes in order), error and flush CQEs included.
//
// ringDoorbell() stores the doorbell record and then the doorbell word with release order, which is what the
// software NIC's mailbox needs. On hardware the doorbell is an MMIO store to the UAR (write-combining; needs an
// sfence and a single 8-byte store): that variant belongs to the verbs layer and is not implemented here.
#pragma once

#include <nccl.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "transport/rdma/mlx5/cqe.h"
#include "transport/rdma/mlx5/ring.h"
#include "transport/rdma/mlx5/wqe.h"

namespace nccl_moe::rdma {

struct SqView {
  uint8_t* buf = nullptr;  // wqe_cnt WQEBBs
  uint32_t wqe_cnt = 0;
  uint32_t* dbrec = nullptr;     // the QP's doorbell record (2 words; the send index is word kSendDbrIndex)
  uint64_t* doorbell = nullptr;  // the doorbell register (software NIC: its mailbox word)
  uint32_t qpn = 0;
};
struct CqView {
  uint8_t* buf = nullptr;  // cqe_cnt CQEs
  uint32_t cqe_cnt = 0;
  uint32_t* dbrec = nullptr;  // the CQ's doorbell record (consumer index at word kCqSetCiDbrIndex)
};

struct Completion {
  uint32_t pi;  // producer index of the completed (or failed) WQE
  mlx5::CqeStatus status;
  mlx5::CqeInfo info;
};

class HostSq {
 public:
  HostSq(const SqView& sq, const CqView& cq);

  uint32_t pi() const { return pi_; }
  uint32_t posted() const { return posted_; }
  uint32_t completed() const { return completed_; }
  uint32_t qpn() const { return sq_.qpn; }
  bool hasRoom(uint32_t num_wqebbs) const { return mlx5::sq_has_room(pi_, completed_, num_wqebbs, sq_.wqe_cnt); }
  // The first error or flush CQE, with a message naming the QP, the WQE and the syndrome.
  bool failed() const { return failed_; }
  const std::string& error() const { return error_; }
  const Completion& firstError() const { return first_error_; }

  // Each builder writes its WQE(s) at pi() and advances pi(); without room (or with arguments the builder
  // cannot encode) it writes nothing and returns false. Nothing is visible to the NIC before ringDoorbell().
  bool postNop(bool signaled);
  bool postWrite(const mlx5::LocalSge& src, const mlx5::RemoteSge& dst, bool signaled,
                 mlx5::FenceMode fence = mlx5::FenceMode::kNone);
  bool postWriteInline(const void* data, uint32_t bytes, const mlx5::RemoteSge& dst, bool signaled);
  bool postFetchAdd(const mlx5::RemoteSge& target, uint64_t add, const mlx5::LocalWord& result, bool signaled,
                    mlx5::FenceMode fence = mlx5::FenceMode::kNone);
  // WRITE then fetch-add on this QP (two WQEBBs); `signaled` asks for the fetch-add's CQE.
  bool postPutSignal(const mlx5::LocalSge& src, const mlx5::RemoteSge& dst, const mlx5::RemoteSge& signal, uint64_t add,
                     const mlx5::LocalWord& result, bool signaled);
  // Copies one WQEBB as given (tests: WQEs the builders would never produce).
  bool postRawWqebb(const uint8_t* wqebb);
  // Advances pi() without writing (tests: a producer index passing an unwritten WQE).
  void skip(uint32_t num_wqebbs);
  // Asks for a CQE on the last WQE written and not yet announced (no-op when there is none).
  void signalLast();

  // Announces WQEs < pi(): doorbell record, then the doorbell word (release stores).
  void ringDoorbell();
  // Announces an arbitrary producer index (tests: SQ overrun, stale doorbells).
  void ringDoorbellAt(uint32_t pi);

  // Consumes every ready CQE (appending them to `out` if given) and publishes the CQ consumer index. Returns
  // the number consumed.
  int poll(std::vector<Completion>* out = nullptr);
  // Polls until completed() reaches `target` (mod 2^32), an error CQE arrives, or `timeout_s` passes; calls
  // `progress` between polls (e.g. the software NIC's step()). ncclSuccess, ncclRemoteError (error CQE, message
  // recorded) or ncclSystemError (timeout: message names the QP, the indices and the wait).
  ncclResult_t waitCompleted(uint32_t target, double timeout_s, const std::function<void()>& progress = {});
  // Waits until `num_wqebbs` fit, polling the CQ (same outcomes as waitCompleted).
  ncclResult_t waitRoom(uint32_t num_wqebbs, double timeout_s, const std::function<void()>& progress = {});

 private:
  uint8_t* slot(uint32_t pi) const { return mlx5::SqRing{sq_.buf, sq_.wqe_cnt}.wqebb(pi); }
  void advance(uint32_t ds);

  SqView sq_;
  CqView cq_;
  uint32_t pi_ = 0;
  uint32_t posted_ = 0;
  uint32_t completed_ = 0;
  uint32_t cq_ci_ = 0;
  uint32_t last_wqe_pi_ = 0;
  bool has_unannounced_ = false;
  std::vector<uint8_t> wqebbs_;  // per slot: WQEBBs of the WQE starting there
  bool failed_ = false;
  std::string error_;
  Completion first_error_{};
};

}  // namespace nccl_moe::rdma
