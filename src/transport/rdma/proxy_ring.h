// The request-proxy ring (design notes §3.2): a GPU (producer) asks a CPU thread (consumer, request_proxy.h) to
// post RDMA operations for it, for NICs or machines where the GPU cannot write WQEs and ring doorbells itself.
// Descriptor format and index arithmetic are __host__ __device__ (MOE_HD); the host helpers at the end stand in for
// the GPU producer in tests and read descriptors for the consumer.
//
// Ring: num_slots (a power of two) 64-byte descriptors in host-pinned memory the GPU writes through its mapping.
// Indices are free-running 32-bit sequence numbers: descriptor seq lives in slot seq & (num_slots - 1), and all
// comparisons are modular ((int32_t)(a - b) < 0 means a is before b), so the indices may wrap 2^32.
//
//   producer_index   producer-private (GPU memory): next seq to reserve, taken with an atomic add
//   consumed         consumer -> producer: descriptors < consumed were copied out; their slots are free again.
//                    Credits: the producer writes seq only when seq - consumed < num_slots.
//   completed        consumer -> producer: descriptors < completed have completed at the NIC (their sources may
//                    be reused; a quiet waits for completed >= its seq + 1)
//   error            consumer -> producer: nonzero once the proxy failed (ProxyError); bounded waits check it
//
// Descriptor, 8 qwords. Bit 63 of EVERY qword is the phase bit of the lap the descriptor belongs to:
// phase(seq) = 1 on even laps ((seq & num_slots) == 0), 0 on odd ones. The producer may write the qwords in any
// order and with any store width down to 8 bytes (the GPU writes four 16-byte stores, st_relaxed_sys_v2, after a
// system-scope fence that orders its data before the descriptor); the consumer takes a slot only when all 8 phase
// bits show the expected lap, so it never reads a half-written descriptor, and nobody has to clear slots. The
// sequence number in qword 0 must equal the index read at: a producer that ignored credits and wrote lap L+1 over
// an unconsumed lap-L descriptor is recognised (proxy_desc_overrun).
//
//   q0  op:4 | flags:4 (0) | qp:16 | seq:32 | reserved:7        (bits 0-3, 4-7, 8-23, 24-55, 56-62)
//   q1  bytes:31 | local_key:32                                 (0-30, 31-62)
//   q2  remote_key:32 | reserved:31
//   q3  signal_key:32 | reserved:31
//   q4  local_offset:63     (into the window local_key names)
//   q5  remote_offset:63    (into the peer's window remote_key names)
//   q6  signal_offset:63    (into the peer's window signal_key names; 8-byte aligned)
//   q7  signal_add:63
//
//   op          fields used                          becomes (request_proxy.h)
//   kPut        bytes, local, remote                 RDMA WRITE
//   kPutSignal  bytes, local, remote, signal, add    RDMA WRITE + fetch-add on the same QP (one descriptor, so the
//                                                    signal can never be separated from its data)
//   kSignal     signal, add                          fetch-add
//   kQuiet      -                                    nothing posted; ends the consumer's batch (every QP's last WQE
//                                                    is signaled and rung) so that completed reaches it promptly
#pragma once

#include <cstdint>

#include "transport/rdma/mlx5/byte_order.h"

namespace nccl_moe::rdma {

enum class ProxyOp : uint8_t { kInvalid = 0, kPut = 1, kPutSignal = 2, kSignal = 3, kQuiet = 4 };

struct ProxyRequest {
  ProxyOp op = ProxyOp::kInvalid;
  uint16_t qp = 0;     // index into the consumer's QP list (one peer per QP)
  uint32_t bytes = 0;  // < 2^31 (an RDMA WRITE's limit)
  uint32_t local_key = 0;
  uint64_t local_offset = 0;
  uint32_t remote_key = 0;
  uint64_t remote_offset = 0;
  uint32_t signal_key = 0;
  uint64_t signal_offset = 0;
  uint64_t signal_add = 0;  // < 2^63
};

struct alignas(64) ProxyDesc {
  uint64_t q[8];
};
static_assert(sizeof(ProxyDesc) == 64, "a proxy descriptor is one 64-byte line");

// consumer -> producer words, each on its own line (host memory mapped to the GPU).
struct ProxyRingShared {
  alignas(64) uint32_t consumed;
  alignas(64) uint32_t completed;
  alignas(64) uint32_t error;
};

struct ProxyRing {
  ProxyDesc* slots = nullptr;
  uint32_t num_slots = 0;
  uint32_t* producer_index = nullptr;
  ProxyRingShared* shared = nullptr;
};

enum class ProxyError : uint32_t {
  kNone = 0,
  kBadDescriptor = 1,  // a descriptor failed to decode (op, reserved bits, sequence number)
  kOverrun = 2,        // the producer wrote past its credits
  kTranslation = 3,    // a key or offset range outside the registered windows
  kCompletion = 4,     // an error CQE
  kPost = 5,           // the proxy could not post (e.g. the SQ stayed full past the timeout)
};

constexpr uint64_t kProxyPhaseBit = 1ull << 63;
constexpr uint64_t kProxyPayloadMask = kProxyPhaseBit - 1;
constexpr uint32_t kProxyMaxBytes = 0x7fffffffu;
constexpr uint32_t kProxyMaxSlots = 1u << 30;

MOE_HD constexpr bool is_valid_proxy_ring_size(uint32_t num_slots) {
  return num_slots != 0 && num_slots <= kProxyMaxSlots && (num_slots & (num_slots - 1)) == 0;
}
MOE_HD constexpr uint32_t proxy_slot(uint32_t seq, uint32_t num_slots) { return seq & (num_slots - 1); }
MOE_HD constexpr uint64_t proxy_phase(uint32_t seq, uint32_t num_slots) {
  return (seq & num_slots) == 0 ? kProxyPhaseBit : 0;
}
// Modular order of rolling indices (valid while they are less than 2^31 apart).
MOE_HD constexpr bool proxy_index_before(uint32_t a, uint32_t b) { return static_cast<int32_t>(a - b) < 0; }
MOE_HD constexpr bool proxy_index_reached(uint32_t counter, uint32_t target) {
  return static_cast<int32_t>(counter - target) >= 0;
}
// Whether the producer may write descriptor `seq` while the consumer has copied out everything below `consumed`.
MOE_HD constexpr bool proxy_has_credit(uint32_t seq, uint32_t consumed, uint32_t num_slots) {
  return seq - consumed < num_slots;
}

// Encodes `r` as descriptor `seq`. Returns false (writing nothing) when a field does not fit its width.
MOE_HD inline bool proxy_encode(const ProxyRequest& r, uint32_t seq, uint32_t num_slots, ProxyDesc* out) {
  if (r.op == ProxyOp::kInvalid || static_cast<uint8_t>(r.op) > static_cast<uint8_t>(ProxyOp::kQuiet)) return false;
  if (r.bytes > kProxyMaxBytes || r.local_offset > kProxyPayloadMask || r.remote_offset > kProxyPayloadMask ||
      r.signal_offset > kProxyPayloadMask || r.signal_add > kProxyPayloadMask)
    return false;
  const uint64_t phase = proxy_phase(seq, num_slots);
  out->q[0] =
      phase | static_cast<uint64_t>(r.op) | (static_cast<uint64_t>(r.qp) << 8) | (static_cast<uint64_t>(seq) << 24);
  out->q[1] = phase | r.bytes | (static_cast<uint64_t>(r.local_key) << 31);
  out->q[2] = phase | r.remote_key;
  out->q[3] = phase | r.signal_key;
  out->q[4] = phase | r.local_offset;
  out->q[5] = phase | r.remote_offset;
  out->q[6] = phase | r.signal_offset;
  out->q[7] = phase | r.signal_add;
  return true;
}

// Whether all 8 qwords carry the phase of descriptor `seq`'s lap.
MOE_HD inline bool proxy_desc_ready(const ProxyDesc& d, uint32_t seq, uint32_t num_slots) {
  const uint64_t phase = proxy_phase(seq, num_slots);
  for (int i = 0; i < 8; ++i)
    if ((d.q[i] & kProxyPhaseBit) != phase) return false;
  return true;
}

// Whether the slot holds the complete descriptor of the NEXT lap (seq + num_slots): the producer wrote it
// before the consumer took descriptor seq, i.e. it ignored its credits.
MOE_HD inline bool proxy_desc_overrun(const ProxyDesc& d, uint32_t seq, uint32_t num_slots) {
  return proxy_desc_ready(d, seq + num_slots, num_slots) &&
         static_cast<uint32_t>((d.q[0] & kProxyPayloadMask) >> 24) == seq + num_slots;
}

enum class ProxyDefect : uint8_t { kNone, kSequence, kOpcode, kReservedBits };

MOE_HD inline const char* proxy_defect_text(ProxyDefect d) {
  switch (d) {
    case ProxyDefect::kNone:
      return "no defect";
    case ProxyDefect::kSequence:
      return "its sequence number is not the index it was read at";
    case ProxyDefect::kOpcode:
      return "unknown op";
    case ProxyDefect::kReservedBits:
      return "reserved bits or flags set";
  }
  return "unknown defect";
}

// Decodes a ready descriptor read at index `seq`.
MOE_HD inline ProxyDefect proxy_decode(const ProxyDesc& d, uint32_t seq, ProxyRequest* out) {
  const uint64_t q0 = d.q[0] & kProxyPayloadMask;
  if (static_cast<uint32_t>(q0 >> 24) != seq) return ProxyDefect::kSequence;
  const uint8_t op = q0 & 0xf;
  if (op == 0 || op > static_cast<uint8_t>(ProxyOp::kQuiet)) return ProxyDefect::kOpcode;
  if (((q0 >> 4) & 0xf) != 0 || (q0 >> 56) != 0 || ((d.q[2] & kProxyPayloadMask) >> 32) != 0 ||
      ((d.q[3] & kProxyPayloadMask) >> 32) != 0)
    return ProxyDefect::kReservedBits;
  out->op = static_cast<ProxyOp>(op);
  out->qp = static_cast<uint16_t>(q0 >> 8);
  out->bytes = static_cast<uint32_t>(d.q[1] & kProxyMaxBytes);
  out->local_key = static_cast<uint32_t>((d.q[1] & kProxyPayloadMask) >> 31);
  out->remote_key = static_cast<uint32_t>(d.q[2]);
  out->signal_key = static_cast<uint32_t>(d.q[3]);
  out->local_offset = d.q[4] & kProxyPayloadMask;
  out->remote_offset = d.q[5] & kProxyPayloadMask;
  out->signal_offset = d.q[6] & kProxyPayloadMask;
  out->signal_add = d.q[7] & kProxyPayloadMask;
  return ProxyDefect::kNone;
}

// Slot contents that no descriptor of the first lap after `start` matches: rings starting at index `start` are
// initialised with this, slot by slot (zeroed memory only works for start = 0 and similar even-lap starts).
MOE_HD inline void proxy_init_slot(ProxyDesc* slot, uint32_t slot_idx, uint32_t start, uint32_t num_slots) {
  const uint32_t first_seq = start + ((slot_idx - start) & (num_slots - 1));  // first index that uses this slot
  const uint64_t stale = proxy_phase(first_seq, num_slots) ^ kProxyPhaseBit;
  for (int i = 0; i < 8; ++i) slot->q[i] = stale;
}

// ---- Host side: the tests' producer (standing in for the GPU) and the consumer's reads ----

// Stores descriptor `d` into `slot` qword by qword (each 8-byte store single-copy atomic), in the order
// `order[0..7]` (nullptr: 0..7), as a producer whose stores land in any order would.
inline void proxy_store_host(ProxyDesc* slot, const ProxyDesc& d, const int* order = nullptr) {
  __atomic_thread_fence(__ATOMIC_RELEASE);  // what the producer wrote before (the put's source) comes first
  for (int i = 0; i < 8; ++i) {
    const int q = order != nullptr ? order[i] : i;
    __atomic_store_n(&slot->q[q], d.q[q], __ATOMIC_RELAXED);
  }
}

// Copies the slot; returns true (with acquire ordering: what the producer wrote before the descriptor is
// visible) when it holds complete descriptor `seq`.
inline bool proxy_load_host(const ProxyDesc* slot, uint32_t seq, uint32_t num_slots, ProxyDesc* copy) {
  for (int i = 0; i < 8; ++i) copy->q[i] = __atomic_load_n(&slot->q[i], __ATOMIC_RELAXED);
  if (!proxy_desc_ready(*copy, seq, num_slots)) return false;
  __atomic_thread_fence(__ATOMIC_ACQUIRE);
  return true;
}

}  // namespace nccl_moe::rdma
