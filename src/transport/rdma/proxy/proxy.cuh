// GPU side of the request proxy (design notes §3.2): what a kernel calls to WRITE, to add to a remote signal
// word and to wait for its operations when a CPU thread posts for it (proxy_thread.h). Same shape as
// ibgda.cuh: each function is called by ONE thread (a lane leader); any number of threads of any blocks may call
// them on the same ring concurrently; they return false on failure, with the cause in the view's ErrorRecord.
// Memory is named by (key, offset into that key's window), as the descriptors carry it.
//
// Posting protocol (rdma/proxy_ring.h):
//   1. validate  the fields fit the descriptor (before reserving: a reserved sequence number is always written)
//   2. reserve   seq = atomicAdd(producer_index, 1)                                    (device memory, relaxed)
//   3. credit    wait until seq - consumed < num_slots     (consumed: ld.acquire.sys of the mapped host word)
//   4. fence     fence.acq_rel.sys: the caller's data (and whatever its block wrote and fenced before calling)
//                is ordered before the descriptor, so the proxy's WQE reads it
//   5. write     the 8 qwords as four 16-byte st.relaxed.sys to the mapped slot; bit 63 of every qword is the
//                lap's phase bit, so the consumer takes the slot only when all of it has landed (no flag, no
//                clearing). No doorbell: the proxy thread polls the slot at its consumed index.
// quiet(): posts a kQuiet descriptor (ends the proxy's batch, so every QP's last WQE gets its CQE and doorbell)
// and waits until completed >= its seq + 1: every descriptor of the RING before it (all QPs of the ring, not
// just this view's) has completed at the NIC, so sources may be reused and the data is at the peer.
//
// Every wait is bounded by timeout_ns and records (phase, rank, peer, qpn, last value, awaited value) with
// kErrTimeout; every wait also watches the ring's error word (the proxy's sticky ProxyError) and records
// kErrNetProxy with the error in `detail`, and gives up early once the record holds another failure. A wait that
// gives up after reserving leaves its sequence number unwritten: the ring is then dead (the proxy waits at that
// slot forever), which is why every failure is recorded and the communicator must be destroyed.
#pragma once

#include "device/ptx.cuh"
#include "device/wait.cuh"
#include "transport/rdma/proxy/gpu_proxy.h"
#include "transport/rdma/proxy_ring.h"

namespace nccl_moe::proxy {

namespace detail {

__device__ __forceinline__ uint32_t ring_error(const GpuProxyQp& q) { return dev::ld_acquire_sys(&q.shared->error); }

// Records the ring's failure (once; the first failure of the record wins). Returns true when there is one.
__device__ __forceinline__ bool check_ring(const GpuProxyQp& q, Phase phase, long long counter, long long expected) {
  const uint32_t e = ring_error(q);
  if (e == 0) return false;
  dev::record_error_at(q.error, q.rank, kErrNetProxy, phase, q.peer, counter, expected, static_cast<int>(q.qpn),
                       static_cast<int>(e));
  return true;
}

// Bounded-wait bookkeeping: true when the wait must stop (ring error or timeout recorded, or another failure
// already recorded).
struct WaitClock {
  uint64_t start = 0;
  uint32_t spins = 0;
  __device__ __forceinline__ bool expired(const GpuProxyQp& q, Phase phase, long long counter, long long expected,
                                          int detail = 0) {
    if ((++spins & 127u) != 0) return false;
    if (check_ring(q, phase, counter, expected)) return true;
    if (start == 0) {
      start = dev::globaltimer_ns();
      return false;
    }
    if (dev::ld_relaxed_sys(&q.error->code) != 0) return true;
    if (dev::globaltimer_ns() - start > q.timeout_ns) {
      dev::record_error_at(q.error, q.rank, kErrTimeout, phase, q.peer, counter, expected, static_cast<int>(q.qpn),
                           detail);
      return true;
    }
    return false;
  }
};

// Steps 2-5 for a request whose fields fit (proxy_encode cannot fail). *seq_out: its sequence number.
__device__ inline bool post(const GpuProxyQp& q, const rdma::ProxyRequest& r, uint32_t* seq_out) {
  if (check_ring(q, Phase::kNetProxyCredit, -1, -1)) return false;
  const uint32_t seq = dev::atom_add_relaxed_gpu(q.producer_index, 1u);
  *seq_out = seq;
  WaitClock clock;
  for (;;) {
    const uint32_t consumed = dev::ld_acquire_sys(&q.shared->consumed);
    if (rdma::proxy_has_credit(seq, consumed, q.num_slots)) break;
    // Awaited: consumed > seq - num_slots (the descriptor that last used this slot was copied out).
    if (clock.expired(q, Phase::kNetProxyCredit, consumed, static_cast<uint32_t>(seq - q.num_slots + 1))) return false;
  }
  rdma::ProxyDesc d;
  rdma::proxy_encode(r, seq, q.num_slots, &d);
  // The data this descriptor points at (written before the call, fenced by its writers) before the descriptor.
  dev::fence_acq_rel_sys();
  uint64_t* slot = q.slots[rdma::proxy_slot(seq, q.num_slots)].q;
  for (int i = 0; i < 8; i += 2) dev::st_relaxed_sys_v2(slot + i, d.q[i], d.q[i + 1]);
  return true;
}

__device__ __forceinline__ bool fits(uint64_t a, uint64_t b, uint64_t c) {
  return a <= rdma::kProxyPayloadMask && b <= rdma::kProxyPayloadMask && c <= rdma::kProxyPayloadMask;
}

}  // namespace detail

// RDMA WRITE of `bytes` (< 2^31) from local_offset in the window q.lkey to remote_offset in the peer's window
// `rkey`.
__device__ inline bool put(const GpuProxyQp& q, uint64_t local_offset, uint64_t remote_offset, uint32_t rkey,
                           uint32_t bytes) {
  if (bytes > rdma::kProxyMaxBytes || !detail::fits(local_offset, remote_offset, 0)) return false;
  rdma::ProxyRequest r;
  r.op = rdma::ProxyOp::kPut;
  r.qp = q.qp;
  r.bytes = bytes;
  r.local_key = q.lkey;
  r.local_offset = local_offset;
  r.remote_key = rkey;
  r.remote_offset = remote_offset;
  uint32_t seq;
  return detail::post(q, r, &seq);
}

// The peer's 64-bit word at signal_offset (8-byte aligned) in window signal_rkey += add (< 2^63).
__device__ inline bool signal(const GpuProxyQp& q, uint64_t signal_offset, uint32_t signal_rkey, uint64_t add) {
  if (!detail::fits(signal_offset, add, 0)) return false;
  rdma::ProxyRequest r;
  r.op = rdma::ProxyOp::kSignal;
  r.qp = q.qp;
  r.signal_key = signal_rkey;
  r.signal_offset = signal_offset;
  r.signal_add = add;
  uint32_t seq;
  return detail::post(q, r, &seq);
}

// WRITE then fetch-add as ONE descriptor (the proxy posts both on this QP: RC order places the data before the
// signal, and no other descriptor can come between them).
__device__ inline bool put_signal(const GpuProxyQp& q, uint64_t local_offset, uint64_t remote_offset, uint32_t rkey,
                                  uint32_t bytes, uint64_t signal_offset, uint32_t signal_rkey, uint64_t add) {
  if (bytes > rdma::kProxyMaxBytes || !detail::fits(local_offset, remote_offset, signal_offset) ||
      !detail::fits(add, 0, 0))
    return false;
  rdma::ProxyRequest r;
  r.op = rdma::ProxyOp::kPutSignal;
  r.qp = q.qp;
  r.bytes = bytes;
  r.local_key = q.lkey;
  r.local_offset = local_offset;
  r.remote_key = rkey;
  r.remote_offset = remote_offset;
  r.signal_key = signal_rkey;
  r.signal_offset = signal_offset;
  r.signal_add = add;
  uint32_t seq;
  return detail::post(q, r, &seq);
}

// Waits until every descriptor the ring received before this call has completed at the NIC. False on a ring
// error (kErrNetProxy) or a timeout (kNetProxyQuiet with the consumed index in `detail`: a consumed index below
// the awaited one means the proxy never took the quiet).
__device__ inline bool quiet(const GpuProxyQp& q) {
  rdma::ProxyRequest r;
  r.op = rdma::ProxyOp::kQuiet;
  r.qp = q.qp;
  uint32_t seq;
  if (!detail::post(q, r, &seq)) return false;
  const uint32_t target = seq + 1;
  detail::WaitClock clock;
  for (;;) {
    const uint32_t completed = dev::ld_acquire_sys(&q.shared->completed);
    // A ring error seen now fails the quiet too (recorded): the ring is unusable from here on.
    if (rdma::proxy_index_reached(completed, target))
      return !detail::check_ring(q, Phase::kNetProxyQuiet, completed, target);
    const uint32_t consumed = dev::ld_acquire_sys(&q.shared->consumed);
    if (clock.expired(q, Phase::kNetProxyQuiet, completed, target, static_cast<int>(consumed))) return false;
  }
}

}  // namespace nccl_moe::proxy
