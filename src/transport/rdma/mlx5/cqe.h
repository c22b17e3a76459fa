// mlx5 completion queue entries: layout, ownership over laps, consumer-index doorbell, decoding of requester and
// error CQEs (host and device; no rdma-core types). The GPU poller (IBGDA), the doorbell proxy and the tests use
// the decoders; the software NIC writes CQEs with the encoders.
//
// A CQ is `cqe_cnt` (a power of two, at most 2^23) 64-byte entries. The consumer keeps a free-running 32-bit
// index ci; entry ci & (cqe_cnt - 1) belongs to software when its opcode is not INVALID and its owner bit equals
// the lap parity (ci / cqe_cnt) & 1 (rdma-core cq.c, get_sw_cqe). Entries start as INVALID with owner 0, so lap 0
// only sees entries the NIC wrote; on later laps a stale entry has the previous lap's owner bit.
// The consumer publishes dbrec[MLX5_CQ_SET_CI = 0] = BE32(ci & 0xffffff): the NIC only keeps 24 bits, and since
// cqe_cnt divides 2^24 the lap parity of the truncated index is the same.
//
// Decoding works on a copy of the 64 bytes; the poller must load op_own first (acquire) and the rest after it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "transport/rdma/mlx5/byte_order.h"

namespace nccl_moe::mlx5 {

constexpr uint32_t kCqeBytes = 64;
constexpr uint32_t kMaxCqeCnt = 1u << 23;
constexpr uint32_t kCqCiMask = 0xffffff;
constexpr uint32_t kCqSetCiDbrIndex = 0;  // MLX5_CQ_SET_CI
constexpr uint32_t kQpnMask = 0xffffff;

// CQE opcodes, bits 7:4 of op_own (mlx5dv.h MLX5_CQE_*).
enum class CqeOpcode : uint8_t {
  kReq = 0,
  kRespWrImm = 1,
  kRespSend = 2,
  kRespSendImm = 3,
  kRespSendInv = 4,
  kResizeCq = 5,
  kNoPacket = 6,
  kSigErr = 12,
  kReqErr = 13,
  kRespErr = 14,
  kInvalid = 15,
};
constexpr uint8_t kCqeFormatCompressed = 3;  // bits 3:2 of op_own; CQE compression is never enabled here

// Error syndromes (mlx5dv.h MLX5_CQE_SYNDROME_*), byte 55 of an error CQE.
enum class CqeSyndrome : uint8_t {
  kLocalLength = 0x01,
  kLocalQpOperation = 0x02,
  kLocalProtection = 0x04,
  kWrFlushed = 0x05,
  kMwBind = 0x06,
  kBadResponse = 0x10,
  kLocalAccess = 0x11,
  kRemoteInvalidRequest = 0x12,
  kRemoteAccess = 0x13,
  kRemoteOperation = 0x14,
  kTransportRetryExceeded = 0x15,
  kRnrRetryExceeded = 0x16,
  kRemoteAborted = 0x22,
};

struct Cqe64 {  // struct mlx5_cqe64 (the leading responder / tag-matching union as bytes)
  uint8_t rsvd0[32];
  Be32 srqn_uidx;
  Be32 imm_inval_pkey;
  uint8_t app;
  uint8_t app_op;
  Be16 app_info;
  Be32 byte_cnt;  // bytes of the completed operation (READ / atomic responses; see below)
  Be64 timestamp;
  Be32 sop_drop_qpn;  // opcode of the completed WQE << 24 | qpn
  Be16 wqe_counter;   // 16-bit index of the completed WQE
  uint8_t signature;
  uint8_t op_own;  // opcode << 4 | format << 2 | solicited << 1 | owner
};
struct ErrCqe {  // struct mlx5_err_cqe
  uint8_t rsvd0[32];
  Be32 srqn;
  uint8_t rsvd1[18];
  uint8_t vendor_err_synd;
  uint8_t syndrome;
  Be32 s_wqe_opcode_qpn;  // opcode of the failed WQE << 24 | qpn
  Be16 wqe_counter;       // 16-bit index of the failed WQE
  uint8_t signature;
  uint8_t op_own;
};
static_assert(sizeof(Cqe64) == kCqeBytes && sizeof(ErrCqe) == kCqeBytes, "CQEs are 64 bytes");
static_assert(offsetof(Cqe64, op_own) == 63 && offsetof(ErrCqe, syndrome) == 55, "CQE layout");

MOE_HD constexpr bool is_valid_cqe_cnt(uint32_t cqe_cnt) {
  return cqe_cnt != 0 && cqe_cnt <= kMaxCqeCnt && (cqe_cnt & (cqe_cnt - 1)) == 0;
}
MOE_HD constexpr uint32_t cq_slot(uint32_t ci, uint32_t cqe_cnt) { return ci & (cqe_cnt - 1); }
MOE_HD constexpr uint8_t cqe_opcode(uint8_t op_own) { return op_own >> 4; }
MOE_HD constexpr uint8_t cqe_format(uint8_t op_own) { return (op_own >> 2) & 3; }
MOE_HD constexpr uint8_t cqe_owner(uint8_t op_own) { return op_own & 1; }
// Owner bit of an entry the NIC wrote on the lap of consumer index ci.
MOE_HD constexpr uint8_t cqe_lap_owner(uint32_t ci, uint32_t cqe_cnt) { return (ci & cqe_cnt) != 0 ? 1 : 0; }
// Whether entry cq_slot(ci) holds a CQE for consumer index ci.
MOE_HD constexpr bool cqe_is_ready(uint8_t op_own, uint32_t ci, uint32_t cqe_cnt) {
  return cqe_opcode(op_own) != static_cast<uint8_t>(CqeOpcode::kInvalid) &&
         cqe_owner(op_own) == cqe_lap_owner(ci, cqe_cnt);
}
// op_own of an entry not yet written by the NIC (what the CQ buffer is initialised to).
constexpr uint8_t kCqeInitialOpOwn = static_cast<uint8_t>(CqeOpcode::kInvalid) << 4;

MOE_HD constexpr Be32 cq_ci_dbr_value(uint32_t ci) { return to_be32(ci & kCqCiMask); }

enum class CqeStatus : uint8_t {
  kEmpty,       // not written for this ci yet
  kSuccess,     // a requester completion (MLX5_CQE_REQ)
  kError,       // a requester error (MLX5_CQE_REQ_ERR): syndrome set
  kUnexpected,  // anything a send-only CQ should never hold (responder, resize, compressed, signature error)
};
struct CqeInfo {
  uint8_t opcode;        // CqeOpcode
  uint8_t wqe_opcode;    // the completed / failed WQE's opcode (WqeOpcode)
  uint16_t wqe_counter;  // its 16-bit index
  uint32_t qpn;
  uint32_t byte_cnt;        // success only
  uint8_t syndrome;         // error only (CqeSyndrome)
  uint8_t vendor_syndrome;  // error only
};

// Decodes the 64 CQE bytes at `cqe` as the entry for consumer index ci.
MOE_HD inline CqeStatus decode_cqe(const void* cqe, uint32_t ci, uint32_t cqe_cnt, CqeInfo* out) {
  const uint8_t* b = static_cast<const uint8_t*>(cqe);
  *out = CqeInfo{};
  const uint8_t op_own = b[offsetof(Cqe64, op_own)];
  out->opcode = cqe_opcode(op_own);
  if (!cqe_is_ready(op_own, ci, cqe_cnt)) return CqeStatus::kEmpty;
  const uint32_t opcode_qpn = load_be32(b + offsetof(Cqe64, sop_drop_qpn));  // same bytes as s_wqe_opcode_qpn
  out->wqe_opcode = static_cast<uint8_t>(opcode_qpn >> 24);
  out->qpn = opcode_qpn & kQpnMask;
  out->wqe_counter = load_be16(b + offsetof(Cqe64, wqe_counter));
  if (cqe_format(op_own) == kCqeFormatCompressed) return CqeStatus::kUnexpected;
  if (out->opcode == static_cast<uint8_t>(CqeOpcode::kReq)) {
    out->byte_cnt = load_be32(b + offsetof(Cqe64, byte_cnt));
    return CqeStatus::kSuccess;
  }
  if (out->opcode == static_cast<uint8_t>(CqeOpcode::kReqErr)) {
    out->syndrome = b[offsetof(ErrCqe, syndrome)];
    out->vendor_syndrome = b[offsetof(ErrCqe, vendor_err_synd)];
    return CqeStatus::kError;
  }
  return CqeStatus::kUnexpected;
}

// What an error syndrome means for this transport, with the usual cause.
MOE_HD inline const char* cqe_syndrome_text(uint8_t syndrome) {
  switch (static_cast<CqeSyndrome>(syndrome)) {
    case CqeSyndrome::kLocalLength:
      return "local length error (gather length exceeds the message or the QP limit)";
    case CqeSyndrome::kLocalQpOperation:
      return "local QP operation error (malformed WQE or QP not in RTS)";
    case CqeSyndrome::kLocalProtection:
      return "local protection error (lkey or local address outside its registration)";
    case CqeSyndrome::kWrFlushed:
      return "work request flushed (the QP was already in the error state)";
    case CqeSyndrome::kMwBind:
      return "memory window bind error";
    case CqeSyndrome::kBadResponse:
      return "bad response (unexpected transport opcode from the responder)";
    case CqeSyndrome::kLocalAccess:
      return "local access error (local buffer not writable for the response)";
    case CqeSyndrome::kRemoteInvalidRequest:
      return "remote invalid request (operation not enabled on the remote QP, or a misaligned atomic)";
    case CqeSyndrome::kRemoteAccess:
      return "remote access error (rkey, remote address range or access rights of the target window)";
    case CqeSyndrome::kRemoteOperation:
      return "remote operation error (the responder could not complete the request)";
    case CqeSyndrome::kTransportRetryExceeded:
      return "transport retry counter exceeded (peer unreachable: link, routing, remote QP state or timeout)";
    case CqeSyndrome::kRnrRetryExceeded:
      return "RNR retry counter exceeded (no receive posted at the responder)";
    case CqeSyndrome::kRemoteAborted:
      return "remote aborted";
  }
  return "unknown syndrome";
}

// ---- Encoders (the software NIC writes CQEs with these; the tests use them to feed the decoders) ----

MOE_HD inline void build_req_cqe(void* cqe, uint16_t wqe_counter, uint8_t wqe_opcode, uint32_t qpn, uint32_t byte_cnt,
                                 uint8_t owner) {
  Cqe64 e{};
  e.byte_cnt = to_be32(byte_cnt);
  e.sop_drop_qpn = to_be32((static_cast<uint32_t>(wqe_opcode) << 24) | (qpn & kQpnMask));
  e.wqe_counter = to_be16(wqe_counter);
  e.op_own = static_cast<uint8_t>((static_cast<uint8_t>(CqeOpcode::kReq) << 4) | (owner & 1));
  *static_cast<Cqe64*>(cqe) = e;
}
MOE_HD inline void build_err_cqe(void* cqe, uint16_t wqe_counter, uint8_t wqe_opcode, uint32_t qpn, uint8_t syndrome,
                                 uint8_t vendor_syndrome, uint8_t owner) {
  ErrCqe e{};
  e.vendor_err_synd = vendor_syndrome;
  e.syndrome = syndrome;
  e.s_wqe_opcode_qpn = to_be32((static_cast<uint32_t>(wqe_opcode) << 24) | (qpn & kQpnMask));
  e.wqe_counter = to_be16(wqe_counter);
  e.op_own = static_cast<uint8_t>((static_cast<uint8_t>(CqeOpcode::kReqErr) << 4) | (owner & 1));
  *static_cast<ErrCqe*>(cqe) = e;
}

}  // namespace nccl_moe::mlx5
