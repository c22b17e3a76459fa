// GPU-initiated RDMA on one mlx5 RC QP (IBGDA, design notes §2.3-§2.4): what a kernel calls to WRITE, to add to
// a remote signal word, and to wait for its operations. Each function is called by ONE thread (a lane leader);
// any number of threads of any blocks may call them on the same QP concurrently.
//
// Posting protocol (per operation of n WQEBBs):
//   1. reserve   base = atomicAdd(state.reserved, n); wait (polling the CQ) until completed >= base + n - wqe_cnt
//   2. write     the WQE(s) at slots base.. with the mlx5 builders (mlx5/wqe.h), plain stores to the SQ
//   3. ready     system fence (the WQE bytes before anything that publishes them), then CAS(ready, base, base + n):
//                the ready index passes a WQE only after every older one is written
//   4. doorbell  under the QP lock: if ready > announced, system fence, st.release.sys of the doorbell record
//                BE32(ready & 0xffff), then st.release.sys of the 8-byte doorbell word {BE32(ready << 8),
//                BE32(qpn << 8)}; announced = ready. Everything ready when the lock holder looks is published at
//                once (doorbell batching).
// The last WQEBB of every operation is signaled, so every operation produces one CQE (gpu_qp.h).
//
// CQ poll (under the QP lock, try-lock: a thread that finds it taken returns and re-reads completed): for each
// entry whose op_own (acquire, system scope) says ready for consumer index ci, the CQE is copied with relaxed
// system loads and decoded (mlx5/cqe.h); completed = its WQE index + 1 (RC completes in order; all WQEs here are
// one WQEBB); an error or flush CQE, or a CQE of another QPN, records kErrNetCqe (syndrome, vendor syndrome and
// opcode in `detail`) and marks the QP failed. Then the CQ doorbell record = BE32(ci).
//
// Every wait is bounded by qp.timeout_ns and records (phase kNet*, rank, peer, qpn, last value, awaited value)
// in qp.error (device_comm.h, record_error_at); it also gives up early once the record holds another failure, as
// the library's other waits do. A function that fails returns false and leaves the QP marked failed.
//
// put/put_signal/signal(..., doorbell = false) write and mark ready without ringing: ring(qp) publishes them
// later (batching). quiet() never rings: it waits for WQEs < ready, so a missing ring is reported as a quiet
// timeout whose record shows the announced index below the awaited one.
#pragma once

#include "device/ptx.cuh"
#include "device/wait.cuh"
#include "transport/rdma/ibgda/gpu_qp.h"
#include "transport/rdma/mlx5/cqe.h"
#include "transport/rdma/mlx5/ring.h"
#include "transport/rdma/mlx5/wqe.h"

namespace nccl_moe::ibgda {

namespace detail {

__device__ __forceinline__ bool qp_failed(const GpuQp& qp) { return dev::ld_relaxed_gpu(&qp.state->failed) != 0; }

__device__ __forceinline__ void fail(const GpuQp& qp, int code, Phase phase, long long counter, long long expected,
                                     int detail = 0) {
  dev::record_error_at(qp.error, qp.rank, code, phase, qp.peer, counter, expected, static_cast<int>(qp.qpn), detail);
  atomicExch(&qp.state->failed, 1u);
}

// Bounded-wait bookkeeping: true when the wait must stop (timeout recorded, or another failure already recorded).
struct WaitClock {
  uint64_t start = 0;
  uint32_t spins = 0;
  __device__ __forceinline__ bool expired(const GpuQp& qp, Phase phase, long long counter, long long expected,
                                          int detail = 0) {
    if ((++spins & 127u) != 0) return false;
    if (start == 0) {
      start = dev::globaltimer_ns();
      return false;
    }
    if (dev::ld_relaxed_sys(&qp.error->code) != 0 || qp_failed(qp)) return true;
    if (dev::globaltimer_ns() - start > qp.timeout_ns) {
      fail(qp, kErrTimeout, phase, counter, expected, detail);
      return true;
    }
    return false;
  }
};

__device__ __forceinline__ bool try_lock(const GpuQp& qp) {
  return dev::atom_cas_acquire_gpu(&qp.state->lock, 0u, 1u) == 0u;
}
__device__ __forceinline__ void unlock(const GpuQp& qp) { dev::st_release_gpu(&qp.state->lock, 0u); }

__device__ __forceinline__ bool lock(const GpuQp& qp) {
  WaitClock clock;
  while (!try_lock(qp)) {
    if (clock.expired(qp, Phase::kNetDoorbell, 1, 0)) return false;
  }
  return true;
}

// Consumes every ready CQE; the caller holds the lock.
__device__ inline void poll_cq_locked(const GpuQp& qp) {
  GpuQpState* s = qp.state;
  // Relaxed (not plain) loads: another SM's last holder of the lock wrote these, and L1 is not coherent.
  uint32_t ci = dev::ld_relaxed_gpu(&s->cq_ci);
  uint32_t completed = dev::ld_relaxed_gpu(&s->completed);
  const uint32_t first_ci = ci;
  for (;;) {
    const uint8_t* entry = qp.cq + static_cast<size_t>(mlx5::cq_slot(ci, qp.cqe_cnt)) * mlx5::kCqeBytes;
    // Bytes 60..63: wqe_counter, signature, op_own. The acquire orders the reads of the rest after it.
    const uint32_t tail = dev::ld_acquire_sys(reinterpret_cast<const uint32_t*>(entry + 60));
    const uint8_t op_own = static_cast<uint8_t>(tail >> 24);
    if (!mlx5::cqe_is_ready(op_own, ci, qp.cqe_cnt)) break;
    alignas(16) uint64_t copy[mlx5::kCqeBytes / 8];
    for (uint32_t i = 0; i < mlx5::kCqeBytes / 8; ++i)
      copy[i] = dev::ld_relaxed_sys(reinterpret_cast<const uint64_t*>(entry) + i);
    mlx5::CqeInfo info;
    const mlx5::CqeStatus status = mlx5::decode_cqe(copy, ci, qp.cqe_cnt, &info);
    const uint32_t pi = mlx5::unwrap_wqe_index(completed, info.wqe_counter);
    ++ci;
    if (status != mlx5::CqeStatus::kSuccess || info.qpn != qp.qpn) {
      const int detail = static_cast<int>(info.syndrome) | (static_cast<int>(info.vendor_syndrome) << 8) |
                         (static_cast<int>(info.wqe_opcode) << 16);
      fail(qp, kErrNetCqe, Phase::kNetCqe, static_cast<long long>(pi),
           info.qpn != qp.qpn ? static_cast<long long>(info.qpn) : -1, detail);
    }
    if (info.qpn == qp.qpn) completed = pi + 1;  // every WQE posted here is one WQEBB
  }
  if (ci != first_ci) {
    dev::st_relaxed_gpu(&s->cq_ci, ci);
    dev::st_release_sys(&qp.cq_dbrec[mlx5::kCqSetCiDbrIndex], mlx5::cq_ci_dbr_value(ci).raw);
    dev::st_release_gpu(&s->completed, completed);
  }
}

// Polls the CQ unless another thread is polling it right now.
__device__ __forceinline__ void poll_cq(const GpuQp& qp) {
  if (!try_lock(qp)) return;
  poll_cq_locked(qp);
  unlock(qp);
}

// Step 1: n WQEBBs at *base, with room in the ring.
__device__ inline bool reserve(const GpuQp& qp, uint32_t n, uint32_t* base) {
  const uint32_t b = dev::atom_add_relaxed_gpu(&qp.state->reserved, n);
  *base = b;
  const uint32_t needed = mlx5::sq_ci_needed(b, n, qp.wqe_cnt);
  WaitClock clock;
  for (;;) {
    const uint32_t completed = dev::ld_acquire_gpu(&qp.state->completed);
    if (static_cast<int32_t>(completed - needed) >= 0) return true;
    poll_cq(qp);
    if (clock.expired(qp, Phase::kNetReserve, completed, needed)) return false;
  }
}

// Step 3: the WQEBBs [base, base + n) are written.
__device__ inline bool mark_ready(const GpuQp& qp, uint32_t base, uint32_t n) {
  // The WQE stores (plain, to host-mapped or device memory) before the ready index and any doorbell covering them.
  dev::fence_acq_rel_sys();
  WaitClock clock;
  for (;;) {
    const uint32_t seen = dev::atom_cas_acq_rel_gpu(&qp.state->ready, base, base + n);
    if (seen == base) return true;
    if (clock.expired(qp, Phase::kNetReady, seen, base)) return false;
  }
}

}  // namespace detail

// Step 4: publishes every ready WQE with one doorbell (no-op when all are announced).
__device__ inline bool ring(const GpuQp& qp) {
  if (!detail::lock(qp)) return false;
  GpuQpState* s = qp.state;
  const uint32_t ready = dev::ld_acquire_gpu(&s->ready);
  if (ready != dev::ld_relaxed_gpu(&s->announced)) {
    dev::fence_acq_rel_sys();
    dev::st_release_sys(&qp.sq_dbrec[mlx5::kSendDbrIndex], mlx5::sq_dbr_value(ready).raw);
    dev::st_release_sys(qp.doorbell, mlx5::sq_doorbell_word(ready, qp.qpn));
    dev::st_relaxed_gpu(&s->announced, ready);
  }
  detail::unlock(qp);
  return true;
}

// RDMA WRITE of `bytes` (< 2^31) from local_addr (inside the window of qp.lkey) to remote_addr (window rkey).
__device__ inline bool put(const GpuQp& qp, uint64_t local_addr, uint64_t remote_addr, uint32_t rkey, uint32_t bytes,
                           bool doorbell = true) {
  if (bytes > mlx5::kMaxGatherBytes || detail::qp_failed(qp)) return false;
  uint32_t base;
  if (!detail::reserve(qp, 1, &base)) return false;
  const mlx5::SqRing sq{qp.sq, qp.wqe_cnt};
  mlx5::build_write(sq.wqebb(base),
                    mlx5::WriteWqe{mlx5::WqeCtrl{base, qp.qpn, true, mlx5::FenceMode::kNone},
                                   mlx5::LocalSge{local_addr, qp.lkey, bytes}, mlx5::RemoteSge{remote_addr, rkey}});
  if (!detail::mark_ready(qp, base, 1)) return false;
  return !doorbell || ring(qp);
}

// signal_addr += add (64-bit fetch-add, 8-byte aligned word in the window signal_rkey).
__device__ inline bool signal(const GpuQp& qp, uint64_t signal_addr, uint32_t signal_rkey, uint64_t add,
                              bool doorbell = true) {
  if (detail::qp_failed(qp)) return false;
  uint32_t base;
  if (!detail::reserve(qp, 1, &base)) return false;
  const mlx5::SqRing sq{qp.sq, qp.wqe_cnt};
  const uint64_t result = reinterpret_cast<uint64_t>(&qp.state->atomic_result);
  mlx5::build_fetch_add(sq.wqebb(base), mlx5::FetchAddWqe{mlx5::WqeCtrl{base, qp.qpn, true, mlx5::FenceMode::kNone},
                                                          mlx5::RemoteSge{signal_addr, signal_rkey}, add,
                                                          mlx5::LocalWord{result, qp.result_lkey}});
  if (!detail::mark_ready(qp, base, 1)) return false;
  return !doorbell || ring(qp);
}

// WRITE then fetch-add on this QP, reserved together (RC order: the signal is performed after the data is placed).
__device__ inline bool put_signal(const GpuQp& qp, uint64_t local_addr, uint64_t remote_addr, uint32_t rkey,
                                  uint32_t bytes, uint64_t signal_addr, uint32_t signal_rkey, uint64_t add,
                                  bool doorbell = true) {
  if (bytes > mlx5::kMaxGatherBytes || detail::qp_failed(qp)) return false;
  uint32_t base;
  if (!detail::reserve(qp, 2, &base)) return false;
  const uint64_t result = reinterpret_cast<uint64_t>(&qp.state->atomic_result);
  const mlx5::PutSignal op{base,
                           qp.qpn,
                           mlx5::LocalSge{local_addr, qp.lkey, bytes},
                           mlx5::RemoteSge{remote_addr, rkey},
                           mlx5::RemoteSge{signal_addr, signal_rkey},
                           add,
                           mlx5::LocalWord{result, qp.result_lkey},
                           true};
  mlx5::build_put_signal(mlx5::SqRing{qp.sq, qp.wqe_cnt}, op);
  if (!detail::mark_ready(qp, base, 2)) return false;
  return !doorbell || ring(qp);
}

// Waits until every WQE marked ready before the call has completed (its CQE was polled). False on an error CQE
// (recorded) or a timeout (recorded with the announced index: a missing doorbell shows as announced < expected).
__device__ inline bool quiet(const GpuQp& qp) {
  const uint32_t target = dev::ld_acquire_gpu(&qp.state->ready);
  detail::WaitClock clock;
  for (;;) {
    if (detail::qp_failed(qp)) return false;
    const uint32_t completed = dev::ld_acquire_gpu(&qp.state->completed);
    if (static_cast<int32_t>(completed - target) >= 0) return !detail::qp_failed(qp);
    detail::poll_cq(qp);
    if (clock.expired(qp, Phase::kNetQuiet, completed, target,
                      static_cast<int>(dev::ld_relaxed_gpu(&qp.state->announced))))
      return false;
  }
}

}  // namespace nccl_moe::ibgda
