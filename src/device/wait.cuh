// Bounded waits. Every device-side wait in the library goes through these: it polls with acquire
// ordering until the condition holds or NCCL_MOE_TIMEOUT_S expires; on expiry it records (phase, rank,
// peer, last value, expected value) in the communicator's host-mapped ErrorRecord and returns false, and
// the caller leaves its kernel without touching data it would have consumed. A wait also gives up early
// when another wait of the same rank already failed (the error word is non-zero), so one lost peer does
// not cost one timeout per waiting warp.
#pragma once

#include "device/device_comm.h"
#include "device/ptx.cuh"

namespace nccl_moe {
namespace dev {

// Claims `rec` once (later failures keep the first cause) and fills it. `qpn` and `detail` are the scale-out
// transport's fields (device_comm.h); other phases pass -1 and 0. `value`: kErrBadExpertId's id.
__device__ __forceinline__ void record_error_at(ErrorRecord* rec, int rank, int code, Phase phase, int peer,
                                                long long counter, long long expected, int qpn = -1, int detail = 0,
                                                long long value = 0) {
  if (atom_cas_acq_rel_sys(&rec->code, 0, -1) == 0) {
    rec->phase = static_cast<int>(phase);
    rec->rank = rank;
    rec->peer = peer;
    rec->counter = counter;
    rec->expected = expected;
    rec->qpn = qpn;
    rec->detail = detail;
    rec->value = value;
    fence_acq_rel_sys();
    st_release_sys(&rec->code, code);
  }
}

__device__ __forceinline__ void record_error(const DeviceComm& comm, int code, Phase phase, int peer, long long counter,
                                             long long expected, long long value = 0) {
  record_error_at(comm.error, comm.rank, code, phase, peer, counter, expected, -1, 0, value);
}

__device__ __forceinline__ bool error_recorded(const DeviceComm& comm) {
  return ld_relaxed_sys(&comm.error->code) != 0;
}

// Waits until *flag >= target (signed compare). Returns true on success. With sleep_ns the poll pauses about that
// long between loads (for waits that are known to be long, so that the poll does not crowd the memory system).
// qpn / detail: what a timeout records besides the peer (a flag that travels on a scale-out QP names it).
template <typename T>
__device__ __forceinline__ bool wait_geq(const DeviceComm& comm, const T* flag, T target, Phase phase, int peer,
                                         unsigned sleep_ns = 0, int qpn = -1, int detail = 0) {
  T seen = ld_acquire_sys(flag);
  if (seen >= target) return true;
  const uint64_t start = globaltimer_ns();
  uint32_t spins = 0;
  while (true) {
    if (sleep_ns != 0) __nanosleep(sleep_ns);
    seen = ld_acquire_sys(flag);
    if (seen >= target) return true;
    if ((++spins & 255u) == 0) {
      if (error_recorded(comm)) return false;
      if (globaltimer_ns() - start > comm.timeout_ns) {
        record_error_at(comm.error, comm.rank, kErrTimeout, phase, peer, static_cast<long long>(seen),
                        static_cast<long long>(target), qpn, detail);
        return false;
      }
    }
  }
}

// Waits until *flag == target.
template <typename T>
__device__ __forceinline__ bool wait_eq(const DeviceComm& comm, const T* flag, T target, Phase phase, int peer) {
  const uint64_t start = globaltimer_ns();
  uint32_t spins = 0;
  while (true) {
    T seen = ld_acquire_sys(flag);
    if (seen == target) return true;
    if ((++spins & 255u) == 0) {
      if (error_recorded(comm)) return false;
      if (globaltimer_ns() - start > comm.timeout_ns) {
        record_error(comm, kErrTimeout, phase, peer, static_cast<long long>(seen), static_cast<long long>(target));
        return false;
      }
    }
  }
}

// ---- Rank masks (config.enable_rank_masks; only the LL kernels' masked variants call these) ----

// Whether `peer` is masked in this rank's mask (comm.rank_mask non-null).
__device__ __forceinline__ bool rank_masked(const DeviceComm& comm, int peer) {
  return ld_relaxed_sys(&comm.rank_mask[peer]) != 0;
}
// Masks `peer` (idempotent; every block and later kernel of this rank sees it).
__device__ __forceinline__ void mask_rank(const DeviceComm& comm, int peer) {
  st_relaxed_sys(&comm.rank_mask[peer], 1);
}

enum WaitOutcome : int { kWaitFailed = -1, kWaitMasked = 0, kWaitArrived = 1 };

// wait_geq on a flag that `peer` publishes, with rank masks on: returns kWaitArrived once *flag >= target;
// kWaitMasked at once when `peer` is masked (before or during the wait, e.g. by another block's timeout), or when
// the wait times out, after masking `peer` (no error is recorded); kWaitFailed when another error was recorded, or
// on a timeout waiting for this rank itself (peer < 0 or == rank: not maskable, recorded as without masks). Out of
// line: the masked kernels' register budget stays with their hot loops.
template <typename T>
__device__ __noinline__ int wait_geq_or_mask(const DeviceComm& comm, const T* flag, T target, Phase phase, int peer,
                                             unsigned sleep_ns = 0) {
  const bool maskable = peer >= 0 && peer != comm.rank;
  if (maskable && rank_masked(comm, peer)) return kWaitMasked;
  T seen = ld_acquire_sys(flag);
  if (seen >= target) return kWaitArrived;
  const uint64_t start = globaltimer_ns();
  uint32_t spins = 0;
  while (true) {
    if (sleep_ns != 0) __nanosleep(sleep_ns);
    seen = ld_acquire_sys(flag);
    if (seen >= target) return kWaitArrived;
    if ((++spins & 255u) == 0) {
      if (error_recorded(comm)) return kWaitFailed;
      if (maskable && rank_masked(comm, peer)) return kWaitMasked;
      if (globaltimer_ns() - start > comm.timeout_ns) {
        if (maskable) {
          mask_rank(comm, peer);
          return kWaitMasked;
        }
        record_error(comm, kErrTimeout, phase, peer, static_cast<long long>(seen), static_cast<long long>(target));
        return kWaitFailed;
      }
    }
  }
}

// wait_geq for a word a block of this rank's own grid publishes after its own waits on peers (the receive team's
// ready word), with rank masks on: that block may spend up to a timeout per lost peer before it publishes, so this
// wait is bounded by `scale` timeouts instead of one.
template <typename T>
__device__ __noinline__ bool wait_geq_local_scaled(const DeviceComm& comm, const T* flag, T target, Phase phase,
                                                   unsigned sleep_ns, int scale) {
  if (ld_acquire_sys(flag) >= target) return true;
  const uint64_t start = globaltimer_ns();
  uint32_t spins = 0;
  while (true) {
    if (sleep_ns != 0) __nanosleep(sleep_ns);
    const T seen = ld_acquire_sys(flag);
    if (seen >= target) return true;
    if ((++spins & 255u) == 0) {
      if (error_recorded(comm)) return false;
      if (globaltimer_ns() - start > comm.timeout_ns * static_cast<uint64_t>(scale)) {
        record_error(comm, kErrTimeout, phase, -1, static_cast<long long>(seen), static_cast<long long>(target));
        return false;
      }
    }
  }
}

}  // namespace dev
}  // namespace nccl_moe
