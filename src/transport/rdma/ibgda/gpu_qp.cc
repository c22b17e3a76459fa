#include "transport/rdma/ibgda/gpu_qp.h"

#include <cstdio>
#include <type_traits>

#include "transport/rdma/mlx5/cqe.h"
#include "transport/rdma/mlx5/ring.h"
#include "transport/rdma/mlx5/wqe.h"

namespace nccl_moe::ibgda {

namespace m = nccl_moe::mlx5;

static_assert(std::is_trivially_copyable<GpuQp>::value, "kernels receive GpuQp by value");
static_assert(std::is_trivially_copyable<GpuQpState>::value, "GpuQpState is zeroed with a memset");

std::string buildGpuQp(const GpuQpQueues& q, const GpuQpBinding& b, GpuQp* out) {
  if (out == nullptr) return "no output view";
  if (q.sq == nullptr || q.sq_dbrec == nullptr || q.doorbell == nullptr || q.cq == nullptr || q.cq_dbrec == nullptr ||
      q.state == nullptr)
    return "a queue pointer is null (sq, sq_dbrec, doorbell, cq, cq_dbrec and state are all required)";
  if (b.error == nullptr) return "no error record";
  if (!m::is_valid_wqe_cnt(q.wqe_cnt))
    return "wqe_cnt " + std::to_string(q.wqe_cnt) + " is not a power of two in [1, " + std::to_string(m::kMaxWqeCnt) +
           "]";
  if (!m::is_valid_cqe_cnt(q.cqe_cnt)) return "cqe_cnt " + std::to_string(q.cqe_cnt) + " is not a valid CQ size";
  if (q.cqe_cnt < q.wqe_cnt)
    return "cqe_cnt " + std::to_string(q.cqe_cnt) + " < wqe_cnt " + std::to_string(q.wqe_cnt) +
           ": every GPU WQE is signaled, so the CQ could overrun";
  if (q.wqe_cnt < 4) return "wqe_cnt must be at least 4 (a put+signal takes two WQEBBs)";
  if ((b.qpn & ~m::kQpnMask) != 0 || b.qpn == 0) return "QPN " + std::to_string(b.qpn) + " is not a 24-bit QPN";
  if (b.timeout_ns == 0) return "timeout_ns is 0 (every wait must be bounded)";
  if ((reinterpret_cast<uintptr_t>(q.sq) % m::kWqebbBytes) != 0 || (reinterpret_cast<uintptr_t>(q.cq) % 64) != 0)
    return "sq and cq must be 64-byte aligned";
  if ((reinterpret_cast<uintptr_t>(q.doorbell) % 8) != 0) return "the doorbell word must be 8-byte aligned";
  GpuQp v{};
  v.sq = q.sq;
  v.wqe_cnt = q.wqe_cnt;
  v.qpn = b.qpn;
  v.sq_dbrec = q.sq_dbrec;
  v.doorbell = q.doorbell;
  v.cq = q.cq;
  v.cqe_cnt = q.cqe_cnt;
  v.lkey = b.src_lkey;
  v.cq_dbrec = q.cq_dbrec;
  v.state = q.state;
  v.result_lkey = b.result_lkey;
  v.rank = b.rank;
  v.peer = b.peer;
  v.timeout_ns = b.timeout_ns;
  v.error = b.error;
  *out = v;
  return "";
}

std::string describeNetError(const ErrorRecord& r, uint64_t timeout_ns) {
  char buf[512];
  const Phase phase = static_cast<Phase>(r.phase);
  const double timeout_s = static_cast<double>(timeout_ns) * 1e-9;
  if (r.code == kErrNone) return "no error";
  if (r.code == kErrNetCqe) {
    const uint8_t syndrome = static_cast<uint8_t>(r.detail & 0xff);
    const uint8_t vendor = static_cast<uint8_t>((r.detail >> 8) & 0xff);
    const uint8_t opcode = static_cast<uint8_t>((r.detail >> 16) & 0xff);
    std::snprintf(buf, sizeof(buf),
                  "phase %s: rank %d, QP 0x%x to peer %d: WQE %lld (%s) completed with syndrome 0x%02x (%s), vendor "
                  "syndrome 0x%02x; the QP is in the error state",
                  phaseName(phase), r.rank, static_cast<unsigned>(r.qpn), r.peer, r.counter, m::wqe_opcode_name(opcode),
                  syndrome, m::cqe_syndrome_text(syndrome), vendor);
    return buf;
  }
  if (r.code == kErrTimeout) {
    const char* what = "";
    switch (phase) {
      case Phase::kNetReserve:
        what = "send-queue room: completed index";
        break;
      case Phase::kNetReady:
        what = "older reservations to be written: ready index";
        break;
      case Phase::kNetDoorbell:
        what = "the QP lock (doorbell / CQ poll): lock word";
        break;
      case Phase::kNetQuiet:
        what = "completion of every submitted WQE: completed index";
        break;
      default:
        what = "counter";
        break;
    }
    int n = std::snprintf(
        buf, sizeof(buf),
        "phase %s: rank %d, QP 0x%x to peer %d: gave up after %.3f s waiting for %s %lld, expected %lld",
        phaseName(phase), r.rank, static_cast<unsigned>(r.qpn), r.peer, timeout_s, what, r.counter, r.expected);
    if (phase == Phase::kNetQuiet && n > 0 && static_cast<size_t>(n) < sizeof(buf))
      std::snprintf(buf + n, sizeof(buf) - static_cast<size_t>(n), " (announced by a doorbell: %d%s)", r.detail,
                    static_cast<long long>(r.detail) < r.expected ? "; WQEs were written but never rung" : "");
    return buf;
  }
  std::snprintf(buf, sizeof(buf), "phase %s: rank %d, peer %d, QP 0x%x: error code %d (counter %lld, expected %lld)",
                phaseName(phase), r.rank, r.peer, static_cast<unsigned>(r.qpn), r.code, r.counter, r.expected);
  return buf;
}

}  // namespace nccl_moe::ibgda
