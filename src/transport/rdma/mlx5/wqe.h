// mlx5 send WQE encoding: segment layouts and the builders for the operations this transport posts (host and
// device; no rdma-core types). The CPU proxy, the GPU (IBGDA) and the tests build WQEs with these functions and
// the software NIC parses the same bytes (wqe_parse.h), so there is one definition of the format.
//
// A WQE is a run of 16-byte segments, `ds` of them, starting with the control segment; every multi-byte field is
// big-endian (byte_order.h). The builders below produce one-WQEBB WQEs:
//
//   operation          segments                                   ds   opcode
//   NOP                ctrl                                        1    0x00
//   RDMA WRITE         ctrl | raddr | data (gather)                3    0x08  (2: no data segment when 0 bytes)
//   RDMA WRITE inline  ctrl | raddr | inline header + bytes        3-4  0x08  (<= kMaxInlineWriteBytes = 28)
//   fetch-add 64-bit   ctrl | raddr | atomic | data (8 B result)   4    0x12
//   compare-swap 64    ctrl | raddr | atomic | data (8 B result)   4    0x11
//   put + signal       a WRITE at pi and a fetch-add at pi + 1 on the same QP (two WQEBBs)
//
// Builders write exactly ds * 16 bytes at `wqe` (64-byte aligned: a ring slot or a staging WQEBB) and return ds;
// a builder given arguments it cannot encode writes nothing and returns 0. They do not touch memory ordering or
// doorbells: that is the poster's job (§2.3 of the design notes).
//
// Control segment flags (fm_ce_se): bit 7:5 fence mode, 3:2 completion request (2 = CQE always; 0 = CQE only on
// error), bit 1 solicited event. An unsignaled WQE still produces an error CQE when it fails.
#pragma once

#include <cstddef>
#include <cstdint>

#include "transport/rdma/mlx5/byte_order.h"
#include "transport/rdma/mlx5/ring.h"

namespace nccl_moe::mlx5 {

// Opcodes in the low byte of opmod_idx_opcode (mlx5dv.h MLX5_OPCODE_*). The builders use NOP, RDMA_WRITE,
// ATOMIC_CS and ATOMIC_FA; the rest are named so the parser can say what it rejected.
enum class WqeOpcode : uint8_t {
  kNop = 0x00,
  kSendInval = 0x01,
  kRdmaWrite = 0x08,
  kRdmaWriteImm = 0x09,
  kSend = 0x0a,
  kSendImm = 0x0b,
  kTso = 0x0e,
  kRdmaRead = 0x10,
  kAtomicCs = 0x11,
  kAtomicFa = 0x12,
  kAtomicMaskedCs = 0x14,
  kAtomicMaskedFa = 0x15,
  kUmr = 0x25,
};

MOE_HD inline const char* wqe_opcode_name(uint8_t opcode) {
  switch (opcode) {
    case 0x00:
      return "NOP";
    case 0x01:
      return "SEND_INVAL";
    case 0x08:
      return "RDMA_WRITE";
    case 0x09:
      return "RDMA_WRITE_IMM";
    case 0x0a:
      return "SEND";
    case 0x0b:
      return "SEND_IMM";
    case 0x0e:
      return "TSO";
    case 0x10:
      return "RDMA_READ";
    case 0x11:
      return "ATOMIC_CS";
    case 0x12:
      return "ATOMIC_FA";
    case 0x14:
      return "ATOMIC_MASKED_CS";
    case 0x15:
      return "ATOMIC_MASKED_FA";
    case 0x25:
      return "UMR";
    default:
      return "unknown";
  }
}

// Fence mode, bits 7:5 of fm_ce_se. kFence is rdma-core's encoding of IBV_SEND_FENCE (MLX5_WQE_CTRL_FENCE = 4 << 5);
// value 2 (which DOCA GPUNetIO calls "fence") is not produced. The put/signal design needs no fence.
enum class FenceMode : uint8_t {
  kNone = 0,
  kInitiatorSmall = 1,  // MLX5_WQE_CTRL_INITIATOR_SMALL_FENCE
  kStrongOrdering = 3,
  kFence = 4,
};
constexpr uint8_t kCtrlCqUpdate = 2u << 2;  // MLX5_WQE_CTRL_CQ_UPDATE: a CQE for this WQE
constexpr uint8_t kCtrlCeMask = 3u << 2;
constexpr uint8_t kCtrlSolicited = 1u << 1;        // MLX5_WQE_CTRL_SOLICITED
constexpr uint32_t kInlineFlag = 0x80000000u;      // MLX5_INLINE_SEG: set in an inline header's byte count
constexpr uint32_t kMaxGatherBytes = 0x7fffffffu;  // a gather byte count must leave bit 31 (the inline flag) clear
constexpr uint32_t kAtomicBytes = 8;               // 64-bit atomics only (the masked 32-bit forms are not used)

MOE_HD constexpr uint8_t encode_fm_ce_se(bool signaled, FenceMode fence) {
  return static_cast<uint8_t>((static_cast<uint32_t>(fence) << 5) | (signaled ? kCtrlCqUpdate : 0u));
}

// ---- Segment layouts (checked field by field against mlx5dv.h in tests/unit/mlx5_wqe_test.cc) ----

struct CtrlSeg {                     // struct mlx5_wqe_ctrl_seg
  Be32 opmod_idx_opcode;             // opmod << 24 | wqe index << 8 | opcode
  Be32 qpn_ds;                       // qpn << 8 | ds
  uint8_t signature;                 // 0: WQE signatures are not enabled
  uint8_t dci_stream_channel_id[2];  // BE16 at byte 9 (DC only; 0 for RC)
  uint8_t fm_ce_se;
  Be32 imm;  // immediate of the *_IMM opcodes (unused here)
};
struct RaddrSeg {  // struct mlx5_wqe_raddr_seg
  Be64 raddr;
  Be32 rkey;
  Be32 reserved;
};
struct DataSeg {    // struct mlx5_wqe_data_seg (one gather entry)
  Be32 byte_count;  // bit 31 clear
  Be32 lkey;
  Be64 addr;
};
struct InlineHeader {  // struct mlx5_wqe_inl_data_seg; the data follows, padded to 16 bytes
  Be32 byte_count;     // bytes | kInlineFlag
};
struct AtomicSeg {  // struct mlx5_wqe_atomic_seg
  Be64 swap_add;    // the addend (fetch-add) or the swap value (compare-swap)
  Be64 compare;     // compare-swap only; 0 for fetch-add
};
static_assert(sizeof(CtrlSeg) == 16 && sizeof(RaddrSeg) == 16 && sizeof(DataSeg) == 16 && sizeof(AtomicSeg) == 16,
              "WQE segments are 16 bytes");
static_assert(offsetof(CtrlSeg, fm_ce_se) == 11 && offsetof(CtrlSeg, imm) == 12, "control segment layout");
static_assert(sizeof(InlineHeader) == 4, "the inline header is one BE32");

constexpr uint32_t kNopDs = 1;
constexpr uint32_t kWriteDs = 3;
constexpr uint32_t kAtomicDs = 4;
// Inline bytes that fit one WQEBB after the control, remote-address and inline-header fields: 64 - 16 - 16 - 4.
constexpr uint32_t kMaxInlineWriteBytes = kWqebbBytes - sizeof(CtrlSeg) - sizeof(RaddrSeg) - sizeof(InlineHeader);
static_assert(kMaxInlineWriteBytes == 28, "one-WQEBB inline limit");
static_assert(kAtomicDs * kSegBytes == kWqebbBytes, "an atomic WQE fills exactly one WQEBB");

// ds of an inline WRITE carrying `bytes` (0 bytes: no inline segment at all, as rdma-core encodes it).
MOE_HD constexpr uint32_t inline_write_ds(uint32_t bytes) {
  return bytes == 0 ? 2u : 2u + (static_cast<uint32_t>(sizeof(InlineHeader)) + bytes + kSegBytes - 1) / kSegBytes;
}
static_assert(inline_write_ds(12) == 3 && inline_write_ds(13) == 4 && inline_write_ds(kMaxInlineWriteBytes) == 4,
              "inline ds");

// ---- Segment encoders (the same arguments as rdma-core's mlx5dv_set_ctrl_seg / mlx5dv_set_data_seg) ----

MOE_HD constexpr CtrlSeg make_ctrl_seg(uint16_t wqe_idx, uint8_t opcode, uint8_t opmod, uint32_t qpn, uint8_t fm_ce_se,
                                       uint8_t ds, uint32_t imm_be) {
  return CtrlSeg{to_be32((static_cast<uint32_t>(opmod) << 24) | (static_cast<uint32_t>(wqe_idx) << 8) | opcode),
                 to_be32((qpn << 8) | ds),
                 0,
                 {0, 0},
                 fm_ce_se,
                 Be32{imm_be}};
}
MOE_HD constexpr RaddrSeg make_raddr_seg(uint64_t remote_addr, uint32_t rkey) {
  return RaddrSeg{to_be64(remote_addr), to_be32(rkey), Be32{0}};
}
MOE_HD constexpr DataSeg make_data_seg(uint32_t bytes, uint32_t lkey, uint64_t addr) {
  return DataSeg{to_be32(bytes), to_be32(lkey), to_be64(addr)};
}
MOE_HD constexpr AtomicSeg make_fetch_add_seg(uint64_t add) { return AtomicSeg{to_be64(add), Be64{0}}; }
MOE_HD constexpr AtomicSeg make_compare_swap_seg(uint64_t compare, uint64_t swap) {
  return AtomicSeg{to_be64(swap), to_be64(compare)};
}

// ---- Operation arguments ----

// What every control segment carries besides opcode and ds.
struct WqeCtrl {
  uint32_t pi;    // producer index of the WQE (the segment stores pi & 0xffff)
  uint32_t qpn;   // 24-bit QP number
  bool signaled;  // ask for a CQE on success
  FenceMode fence;
};
struct LocalSge {  // registered local memory
  uint64_t addr;
  uint32_t lkey;
  uint32_t bytes;
};
struct RemoteSge {  // a remote window location
  uint64_t addr;
  uint32_t rkey;
};
struct LocalWord {  // 8 registered bytes that receive an atomic's previous value
  uint64_t addr;
  uint32_t lkey;
};

struct WriteWqe {
  WqeCtrl ctrl;
  LocalSge src;
  RemoteSge dst;
};
struct InlineWriteWqe {
  WqeCtrl ctrl;
  const void* data;  // copied into the WQE; `bytes` <= kMaxInlineWriteBytes
  uint32_t bytes;
  RemoteSge dst;
};
struct FetchAddWqe {
  WqeCtrl ctrl;
  RemoteSge target;  // 8-byte aligned 64-bit word
  uint64_t add;
  LocalWord result;
};
struct CompareSwapWqe {
  WqeCtrl ctrl;
  RemoteSge target;  // 8-byte aligned 64-bit word
  uint64_t compare;
  uint64_t swap;
  LocalWord result;
};
// WRITE src -> dst, then on the same QP `signal += signal_add`, with no fence: the design relies on an RC
// responder executing a QP's requests in order, so that the WRITE's data is placed before the atomic that
// follows it is performed (as NCCL's GIN put-signal and DOCA's put_signal do; the signal window must be
// registered without relaxed ordering, §2.1 of the design notes).
struct PutSignal {
  uint32_t pi;  // the WRITE's index; the fetch-add takes pi + 1
  uint32_t qpn;
  LocalSge src;
  RemoteSge dst;
  RemoteSge signal;
  uint64_t signal_add;
  LocalWord fetch_result;
  bool signaled;  // a CQE for the fetch-add (the WRITE never asks for one: its completion is implied)
};

// ---- Builders ----

namespace detail {
template <typename Seg>
MOE_HD inline void put_seg(void* wqe, uint32_t seg_idx, const Seg& seg) {
  *reinterpret_cast<Seg*>(static_cast<uint8_t*>(wqe) + seg_idx * kSegBytes) = seg;
}
MOE_HD inline void put_ctrl(void* wqe, WqeOpcode opcode, const WqeCtrl& c, uint32_t ds) {
  put_seg(wqe, 0,
          make_ctrl_seg(wqe_index(c.pi), static_cast<uint8_t>(opcode), 0, c.qpn, encode_fm_ce_se(c.signaled, c.fence),
                        static_cast<uint8_t>(ds), 0));
}
}  // namespace detail

MOE_HD inline uint32_t build_nop(void* wqe, const WqeCtrl& ctrl) {
  detail::put_ctrl(wqe, WqeOpcode::kNop, ctrl, kNopDs);
  return kNopDs;
}

MOE_HD inline uint32_t build_write(void* wqe, const WriteWqe& op) {
  if (op.src.bytes > kMaxGatherBytes) return 0;
  // A zero-byte WRITE carries no gather entry (rdma-core skips empty SGEs; a 0 byte count is not "nothing").
  const uint32_t ds = op.src.bytes == 0 ? 2 : kWriteDs;
  detail::put_ctrl(wqe, WqeOpcode::kRdmaWrite, op.ctrl, ds);
  detail::put_seg(wqe, 1, make_raddr_seg(op.dst.addr, op.dst.rkey));
  if (ds == kWriteDs) detail::put_seg(wqe, 2, make_data_seg(op.src.bytes, op.src.lkey, op.src.addr));
  return ds;
}

MOE_HD inline uint32_t build_write_inline(void* wqe, const InlineWriteWqe& op) {
  if (op.bytes > kMaxInlineWriteBytes) return 0;
  const uint32_t ds = inline_write_ds(op.bytes);
  detail::put_ctrl(wqe, WqeOpcode::kRdmaWrite, op.ctrl, ds);
  detail::put_seg(wqe, 1, make_raddr_seg(op.dst.addr, op.dst.rkey));
  if (op.bytes == 0) return ds;
  uint8_t* inl = static_cast<uint8_t*>(wqe) + 2 * kSegBytes;
  *reinterpret_cast<InlineHeader*>(inl) = InlineHeader{to_be32(op.bytes | kInlineFlag)};
  const uint8_t* src = static_cast<const uint8_t*>(op.data);
  const uint32_t padded = (ds - 2) * kSegBytes - static_cast<uint32_t>(sizeof(InlineHeader));
  for (uint32_t i = 0; i < padded; ++i) inl[sizeof(InlineHeader) + i] = i < op.bytes ? src[i] : 0;
  return ds;
}

MOE_HD inline uint32_t build_fetch_add(void* wqe, const FetchAddWqe& op) {
  detail::put_ctrl(wqe, WqeOpcode::kAtomicFa, op.ctrl, kAtomicDs);
  detail::put_seg(wqe, 1, make_raddr_seg(op.target.addr, op.target.rkey));
  detail::put_seg(wqe, 2, make_fetch_add_seg(op.add));
  detail::put_seg(wqe, 3, make_data_seg(kAtomicBytes, op.result.lkey, op.result.addr));
  return kAtomicDs;
}

MOE_HD inline uint32_t build_compare_swap(void* wqe, const CompareSwapWqe& op) {
  detail::put_ctrl(wqe, WqeOpcode::kAtomicCs, op.ctrl, kAtomicDs);
  detail::put_seg(wqe, 1, make_raddr_seg(op.target.addr, op.target.rkey));
  detail::put_seg(wqe, 2, make_compare_swap_seg(op.compare, op.swap));
  detail::put_seg(wqe, 3, make_data_seg(kAtomicBytes, op.result.lkey, op.result.addr));
  return kAtomicDs;
}

// Builds the WRITE at slot(pi) and the fetch-add at slot(pi + 1) (the second may wrap to slot 0). Returns the
// WQEBBs used (2), or 0 when the WRITE cannot be encoded. The caller has reserved both WQEBBs.
MOE_HD inline uint32_t build_put_signal(const SqRing& sq, const PutSignal& op) {
  const WriteWqe write{WqeCtrl{op.pi, op.qpn, false, FenceMode::kNone}, op.src, op.dst};
  if (build_write(sq.wqebb(op.pi), write) == 0) return 0;
  const FetchAddWqe signal{WqeCtrl{op.pi + 1, op.qpn, op.signaled, FenceMode::kNone}, op.signal, op.signal_add,
                           op.fetch_result};
  build_fetch_add(sq.wqebb(op.pi + 1), signal);
  return 2;
}

}  // namespace nccl_moe::mlx5
