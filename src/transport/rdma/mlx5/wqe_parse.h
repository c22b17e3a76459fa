// mlx5 send WQE parser: bytes -> fields, for the software NIC (which executes exactly the bytes the GPU or the
// proxy wrote) and for the tests. Host and device; no rdma-core types.
//
// Contract
//   - parse_wqe() decodes one WQE from contiguous bytes; read_wqe() first copies the WQE at producer index pi out
//     of a send ring (following the wrap at the ring end) and checks the index and QPN the control segment
//     carries against the ones the reader expects (a mismatch outranks every other defect: the slot is stale).
//   - It accepts the operations wqe.h builds (NOP, RDMA WRITE with up to kMaxParsedGathers gather entries or inline
//     data, 64-bit fetch-add and compare-swap) and rejects everything else with a WqeDefect:
//       malformed    the bytes cannot be the WQE they claim to be (ds 0, segments missing for the opcode, an inline
//                    length that disagrees with ds, an inline flag in a gather entry, wrong index or QPN, ...);
//       unsupported  a legal mlx5 encoding this transport never posts (SEND, READ, masked atomics, opmod != 0,
//                    zero-length gather entries, more gather entries than kMaxParsedGathers).
//   - Semantic checks (keys, bounds, atomic alignment) are not the parser's: the executor reports those as the
//     NIC would, with an error CQE.
#pragma once

#include <cstdint>

#include "transport/rdma/mlx5/byte_order.h"
#include "transport/rdma/mlx5/ring.h"
#include "transport/rdma/mlx5/wqe.h"

namespace nccl_moe::mlx5 {

enum class WqeDefect : uint8_t {
  kNone = 0,
  // malformed
  kDsZero,
  kDsReservedBits,
  kTruncated,
  kMissingSegments,
  kInlineLengthMismatch,
  kInlineFlagInGather,
  kAtomicResultSize,
  kIndexMismatch,
  kQpnMismatch,
  // unsupported
  kUnsupportedOpcode,
  kUnsupportedOpmod,
  kEmptyGather,
  kTooManyGathers,
};

MOE_HD constexpr bool is_malformed(WqeDefect d) { return d >= WqeDefect::kDsZero && d <= WqeDefect::kQpnMismatch; }
MOE_HD constexpr bool is_unsupported(WqeDefect d) { return d >= WqeDefect::kUnsupportedOpcode; }

MOE_HD inline const char* wqe_defect_text(WqeDefect d) {
  switch (d) {
    case WqeDefect::kNone:
      return "no defect";
    case WqeDefect::kDsZero:
      return "malformed: ds is 0 (a WQE holds at least its control segment)";
    case WqeDefect::kDsReservedBits:
      return "malformed: ds exceeds its 6-bit field (bits 7:6 of qpn_ds set)";
    case WqeDefect::kTruncated:
      return "malformed: ds reaches past the bytes (or ring) the WQE was read from";
    case WqeDefect::kMissingSegments:
      return "malformed: ds too small for the segments the opcode requires";
    case WqeDefect::kInlineLengthMismatch:
      return "malformed: inline byte count disagrees with ds";
    case WqeDefect::kInlineFlagInGather:
      return "malformed: inline flag set in a gather entry after the first";
    case WqeDefect::kAtomicResultSize:
      return "malformed: an atomic's result gather entry is not 8 bytes";
    case WqeDefect::kIndexMismatch:
      return "malformed: the WQE index is not the producer index it was read at";
    case WqeDefect::kQpnMismatch:
      return "malformed: the WQE names another QP";
    case WqeDefect::kUnsupportedOpcode:
      return "unsupported: opcode not posted by this transport";
    case WqeDefect::kUnsupportedOpmod:
      return "unsupported: nonzero opmod (extended atomics are not used)";
    case WqeDefect::kEmptyGather:
      return "unsupported: zero-length gather entry (builders omit empty entries)";
    case WqeDefect::kTooManyGathers:
      return "unsupported: more gather entries than kMaxParsedGathers";
  }
  return "unknown defect";
}

constexpr uint32_t kMaxParsedGathers = 4;

struct ParsedWqe {
  // control segment
  uint8_t opcode;
  uint8_t opmod;
  uint16_t wqe_idx;
  uint32_t qpn;
  uint32_t ds;
  uint32_t num_wqebbs;
  uint8_t fence_mode;  // bits 7:5 of fm_ce_se (FenceMode values)
  uint8_t ce;          // bits 3:2: 2 = CQE requested
  bool signaled;       // a CQE on success was requested
  bool solicited;
  uint32_t imm_be;
  // remote address (WRITE, atomics)
  uint64_t remote_addr;
  uint32_t rkey;
  // atomics
  uint64_t swap_add;
  uint64_t compare;
  // WRITE payload: inline bytes at `inline_offset` of the WQE bytes, or gather entries (for atomics the result
  // entry, gathers[0])
  bool is_inline;
  uint32_t inline_offset;
  uint32_t inline_bytes;
  uint32_t num_gathers;
  LocalSge gathers[kMaxParsedGathers];
  uint64_t total_bytes;  // bytes the operation moves: the WRITE's length, 8 for an atomic, 0 for NOP
};

namespace detail {
MOE_HD inline uint64_t load_be64(const uint8_t* p) {
  return (static_cast<uint64_t>(load_be32(p)) << 32) | load_be32(p + 4);
}
MOE_HD inline WqeDefect parse_gathers(const uint8_t* wqe, uint32_t first_seg, uint32_t ds, ParsedWqe* out) {
  if (ds - first_seg > kMaxParsedGathers) return WqeDefect::kTooManyGathers;
  for (uint32_t s = first_seg; s < ds; ++s) {
    const uint8_t* seg = wqe + s * kSegBytes;
    const uint32_t byte_count = load_be32(seg);
    if (byte_count & kInlineFlag) return WqeDefect::kInlineFlagInGather;
    if (byte_count == 0) return WqeDefect::kEmptyGather;
    out->gathers[out->num_gathers++] = LocalSge{load_be64(seg + 8), load_be32(seg + 4), byte_count};
    out->total_bytes += byte_count;
  }
  return WqeDefect::kNone;
}
}  // namespace detail

// Decodes the WQE at `wqe` (`avail_bytes` readable bytes). On a defect, the control-segment fields of `out` are
// still filled when the control segment could be read.
MOE_HD inline WqeDefect parse_wqe(const uint8_t* wqe, uint32_t avail_bytes, ParsedWqe* out) {
  *out = ParsedWqe{};
  if (avail_bytes < kSegBytes) return WqeDefect::kTruncated;
  const uint32_t opmod_idx_opcode = load_be32(wqe);
  const uint32_t qpn_ds = load_be32(wqe + 4);
  const uint8_t fm_ce_se = wqe[11];
  out->opcode = static_cast<uint8_t>(opmod_idx_opcode);
  out->wqe_idx = static_cast<uint16_t>(opmod_idx_opcode >> 8);
  out->opmod = static_cast<uint8_t>(opmod_idx_opcode >> 24);
  out->qpn = qpn_ds >> 8;
  out->ds = qpn_ds & 0xff;
  out->num_wqebbs = wqebbs_for_ds(out->ds);
  out->fence_mode = fm_ce_se >> 5;
  out->ce = (fm_ce_se & kCtrlCeMask) >> 2;
  out->signaled = (fm_ce_se & kCtrlCqUpdate) != 0;
  out->solicited = (fm_ce_se & kCtrlSolicited) != 0;
  out->imm_be = to_be32(load_be32(wqe + 12)).raw;

  const uint32_t ds = out->ds;
  if (ds == 0) return WqeDefect::kDsZero;
  if (ds > kMaxDs) return WqeDefect::kDsReservedBits;
  if (ds * kSegBytes > avail_bytes) return WqeDefect::kTruncated;

  const WqeOpcode opcode = static_cast<WqeOpcode>(out->opcode);
  if (opcode != WqeOpcode::kNop && opcode != WqeOpcode::kRdmaWrite && opcode != WqeOpcode::kAtomicFa &&
      opcode != WqeOpcode::kAtomicCs)
    return WqeDefect::kUnsupportedOpcode;
  if (out->opmod != 0) return WqeDefect::kUnsupportedOpmod;
  if (opcode == WqeOpcode::kNop) return WqeDefect::kNone;  // a NOP may pad any ds; its segments are not read

  if (ds < 2) return WqeDefect::kMissingSegments;
  out->remote_addr = detail::load_be64(wqe + kSegBytes);
  out->rkey = load_be32(wqe + kSegBytes + 8);

  if (opcode == WqeOpcode::kRdmaWrite) {
    if (ds == 2) return WqeDefect::kNone;  // zero-byte WRITE
    const uint32_t first = load_be32(wqe + 2 * kSegBytes);
    if (first & kInlineFlag) {
      out->is_inline = true;
      out->inline_offset = 2 * kSegBytes + static_cast<uint32_t>(sizeof(InlineHeader));
      out->inline_bytes = first & ~kInlineFlag;
      out->total_bytes = out->inline_bytes;
      const uint64_t needed =
          2 + (sizeof(InlineHeader) + static_cast<uint64_t>(out->inline_bytes) + kSegBytes - 1) / kSegBytes;
      return needed == ds ? WqeDefect::kNone : WqeDefect::kInlineLengthMismatch;
    }
    return detail::parse_gathers(wqe, 2, ds, out);
  }

  // ATOMIC_FA / ATOMIC_CS: ctrl | raddr | atomic | one 8-byte result entry
  if (ds < kAtomicDs) return WqeDefect::kMissingSegments;
  out->swap_add = detail::load_be64(wqe + 2 * kSegBytes);
  out->compare = detail::load_be64(wqe + 2 * kSegBytes + 8);
  if (ds > kAtomicDs) return WqeDefect::kTooManyGathers;
  const WqeDefect gather = detail::parse_gathers(wqe, 3, ds, out);
  if (gather != WqeDefect::kNone) return gather;
  return out->gathers[0].bytes == kAtomicBytes ? WqeDefect::kNone : WqeDefect::kAtomicResultSize;
}

// Room for the longest WQE (kMaxWqeWqebbs WQEBBs) copied out of a ring.
struct WqeBytes {
  alignas(16) uint8_t bytes[kMaxWqeWqebbs * kWqebbBytes];
};

// Copies the WQE at producer index `pi` out of `sq` (its WQEBBs may wrap to slot 0) and parses it; the control
// segment must carry index pi & 0xffff and QP number `qpn`.
MOE_HD inline WqeDefect read_wqe(const ConstSqRing& sq, uint32_t pi, uint32_t qpn, WqeBytes* copy, ParsedWqe* out) {
  const uint32_t ds = load_be32(sq.wqebb(pi) + 4) & 0xff;
  uint32_t num_wqebbs = wqebbs_for_ds(ds);
  if (num_wqebbs == 0) num_wqebbs = 1;
  if (num_wqebbs > kMaxWqeWqebbs) num_wqebbs = kMaxWqeWqebbs;
  if (num_wqebbs > sq.wqe_cnt) num_wqebbs = sq.wqe_cnt;  // the parser then reports the WQE as truncated
  for (uint32_t b = 0; b < num_wqebbs; ++b) {
    const uint8_t* src = sq.wqebb(pi + b);
    for (uint32_t i = 0; i < kWqebbBytes; ++i) copy->bytes[b * kWqebbBytes + i] = src[i];
  }
  const WqeDefect defect = parse_wqe(copy->bytes, num_wqebbs * kWqebbBytes, out);
  // A wrong index or QPN comes first: it means the slot was not (yet) written for this pi, so whatever else the
  // bytes say is stale.
  if (out->wqe_idx != wqe_index(pi)) return WqeDefect::kIndexMismatch;
  if (out->qpn != (qpn & 0xffffffu)) return WqeDefect::kQpnMismatch;
  return defect;
}

}  // namespace nccl_moe::mlx5
