// Send-queue ring arithmetic and doorbell values for an mlx5 RC QP (host and device).
//
// The SQ is `wqe_cnt` (a power of two, at most 2^15 here) basic blocks of 64 bytes (WQEBB). Producers count WQEBBs
// with a free-running 32-bit producer index `pi` (the next WQEBB to fill): a WQE starting at pi lives at slot
// pi & (wqe_cnt - 1) and carries the 16-bit index pi & 0xffff in its control segment. A WQE of ds 16-byte
// segments takes ceil(ds / 4) WQEBBs; when it runs past the last slot its remaining WQEBBs continue at slot 0
// (rdma-core does the same, providers/mlx5/qp.c). Every WQE this transport builds is one WQEBB (wqe.h), so only
// consecutive WQEs wrap, never one WQE's bytes; the span helpers serve the parser and multi-WQEBB callers.
//
// Posting publishes WQEs < pi in two places (§2.3 of the design notes):
//   doorbell record  dbrec[MLX5_SND_DBR = 1] = BE32(pi & 0xffff)                     (host or GPU memory)
//   doorbell (UAR)   one 8-byte store of {BE32((pi & 0xffff) << 8), BE32(qpn << 8)}   (MMIO)
// The 8 doorbell bytes have the layout of a control segment's first 8 bytes with opcode, opmod and ds 0; the NIC
// inspects only the WQE index and the QPN there. rdma-core's CPU path stores the first 8 bytes of the last WQE it
// posted instead (index = that WQE's own index, not the next free one); the GPU implementations (DOCA GPUNetIO,
// NVSHMEM) ring with the next free index as here.
//
// Free space: WQEBBs [ci, pi) are in flight, where ci is the first WQEBB whose completion is not yet known (RC
// completes in order, so a CQE for the WQE at index c retires every WQEBB up to and including c's). 32-bit modular
// arithmetic keeps this exact across the wrap of pi itself.
#pragma once

#include <cstdint>

#include "transport/rdma/mlx5/byte_order.h"

namespace nccl_moe::mlx5 {

constexpr uint32_t kWqebbBytes = 64;  // MLX5_SEND_WQE_BB
constexpr uint32_t kWqebbShift = 6;   // MLX5_SEND_WQE_SHIFT
constexpr uint32_t kSegBytes = 16;    // the unit of ds
constexpr uint32_t kSegsPerWqebb = kWqebbBytes / kSegBytes;
constexpr uint32_t kMaxDs = 63;  // ds is a 6-bit field (rdma-core's wq_sig masks it with 0x3f)
constexpr uint32_t kMaxWqeWqebbs = (kMaxDs + kSegsPerWqebb - 1) / kSegsPerWqebb;  // 16
constexpr uint32_t kMaxWqeCnt = 1u << 15;  // keeps the 16-bit WQE index unambiguous over the ring
constexpr uint32_t kWqeIndexMask = 0xffff;
constexpr uint32_t kSendDbrIndex = 1;  // MLX5_SND_DBR: the send half of the QP's doorbell record

MOE_HD constexpr bool is_valid_wqe_cnt(uint32_t wqe_cnt) {
  return wqe_cnt != 0 && wqe_cnt <= kMaxWqeCnt && (wqe_cnt & (wqe_cnt - 1)) == 0;
}
MOE_HD constexpr uint32_t sq_slot(uint32_t pi, uint32_t wqe_cnt) { return pi & (wqe_cnt - 1); }
MOE_HD constexpr uint16_t wqe_index(uint32_t pi) { return static_cast<uint16_t>(pi & kWqeIndexMask); }
MOE_HD constexpr uint32_t wqebbs_for_ds(uint32_t ds) { return (ds + kSegsPerWqebb - 1) / kSegsPerWqebb; }

// Where the WQEBBs [pi, pi + num_wqebbs) sit: `num_before_end` of them from `first_slot` on, the rest from slot 0.
struct WqeSpan {
  uint32_t first_slot;
  uint32_t num_before_end;
  uint32_t num_wrapped;
};
MOE_HD constexpr WqeSpan wqe_span(uint32_t pi, uint32_t num_wqebbs, uint32_t wqe_cnt) {
  const uint32_t first = sq_slot(pi, wqe_cnt);
  const uint32_t room = wqe_cnt - first;
  return WqeSpan{first, num_wqebbs < room ? num_wqebbs : room, num_wqebbs < room ? 0u : num_wqebbs - room};
}

// WQEBBs in flight and whether `num_wqebbs` more fit. `ci` is the first WQEBB not known to be complete.
MOE_HD constexpr uint32_t sq_in_flight(uint32_t pi, uint32_t ci) { return pi - ci; }
MOE_HD constexpr bool sq_has_room(uint32_t pi, uint32_t ci, uint32_t num_wqebbs, uint32_t wqe_cnt) {
  return sq_in_flight(pi, ci) <= wqe_cnt && num_wqebbs <= wqe_cnt - sq_in_flight(pi, ci);
}
// The oldest `ci` at which WQEBBs [base, base + num_wqebbs) may be written: base + num_wqebbs - wqe_cnt (the
// reservation wait of §2.3: wait while ci is below this). Meaningful once base + num_wqebbs > wqe_cnt.
MOE_HD constexpr uint32_t sq_ci_needed(uint32_t base, uint32_t num_wqebbs, uint32_t wqe_cnt) {
  return base + num_wqebbs - wqe_cnt;
}

// The 32-bit index whose low 16 bits are `index16`, taken at or after `reference` (within 2^16 of it): turns a
// CQE's 16-bit wqe_counter back into the producer's numbering, given any earlier index still in flight.
MOE_HD constexpr uint32_t unwrap_wqe_index(uint32_t reference, uint16_t index16) {
  return reference + static_cast<uint16_t>(index16 - static_cast<uint16_t>(reference));
}
// 16-bit serial-number order: has `counter` reached `target` (counter - target in [0, 2^15))? The collapsed-CQ
// poll (one CQE slot that the NIC keeps overwriting) compares wqe_counter with the awaited index this way.
MOE_HD constexpr bool wqe_index_reached(uint16_t counter, uint16_t target) {
  return static_cast<uint16_t>(counter - target) < 0x8000u;
}

// Send doorbell record value for producer index pi.
MOE_HD constexpr Be32 sq_dbr_value(uint32_t pi) { return to_be32(pi & kWqeIndexMask); }

// The 8 doorbell bytes (see the header comment), as a struct and as the uint64_t whose little-endian store writes
// them; the latter is what a GPU or CPU writes to the UAR register in one 8-byte store.
struct SqDoorbell {
  Be32 opmod_idx_opcode;
  Be32 qpn_ds;
};
static_assert(sizeof(SqDoorbell) == 8, "the UAR doorbell is one 8-byte store");
MOE_HD constexpr SqDoorbell sq_doorbell(uint32_t pi, uint32_t qpn) {
  return SqDoorbell{to_be32((pi & kWqeIndexMask) << 8), to_be32(qpn << 8)};
}
MOE_HD constexpr uint64_t sq_doorbell_word(uint32_t pi, uint32_t qpn) {
  return (static_cast<uint64_t>(sq_doorbell(pi, qpn).qpn_ds.raw) << 32) | sq_doorbell(pi, qpn).opmod_idx_opcode.raw;
}

// A send queue as the producer sees it: `buf` holds wqe_cnt WQEBBs.
struct SqRing {
  uint8_t* buf;
  uint32_t wqe_cnt;
  MOE_HD uint8_t* wqebb(uint32_t pi) const {
    return buf + (static_cast<uintptr_t>(sq_slot(pi, wqe_cnt)) << kWqebbShift);
  }
};
struct ConstSqRing {
  const uint8_t* buf;
  uint32_t wqe_cnt;
  MOE_HD const uint8_t* wqebb(uint32_t pi) const {
    return buf + (static_cast<uintptr_t>(sq_slot(pi, wqe_cnt)) << kWqebbShift);
  }
};

}  // namespace nccl_moe::mlx5
