// Device pieces shared by the high-throughput notify, dispatch and combine kernels: the view of every rank's
// HT region, the per-call epoch protocol, and warp-wide row copies.
//
// Epoch protocol (what makes the buffer reusable and CUDA graphs replayable):
//   - Every HT collective kernel (notify, dispatch, combine) is one "call". Call e of a rank reads its epoch
//     as HtSync.epoch + 1 from its own region (device memory, so a graph replay gets a fresh epoch); the
//     last block of the kernel to finish stores HtSync.epoch = e. All ranks make the same sequence of
//     collective calls, so their epochs agree without any host-side counter.
//   - Block 0 of call e announces arrive[r] = e into every rank's HtSync (release). A rank that entered
//     call e has finished call e-1 (kernels of one stream), so it no longer reads its slots; a sender
//     therefore waits for arrive[d] >= e before its first store into rank d's slots (the cross-rank
//     barrier that protects slot reuse, paid only by sender warps and overlapped with local work).
//   - Data flags (row_flag, notify flags) carry the epoch of the call that wrote them; readers wait for
//     flag >= e. Nothing is ever reset.
#pragma once

#include <cstdint>

#include "device/device_comm.h"
#include "device/ptx.cuh"
#include "device/wait.cuh"
#include "kernels/intranode/args.h"
#include "mem/ht_layout.h"

namespace nccl_moe {
namespace ht {

constexpr unsigned kFullMask = 0xffffffffu;

// Epoch of the call this kernel runs (same in every block): the last call's epoch + 1 (see begin_call).
__device__ __forceinline__ long long read_call_epoch(const HtDevice& ht) {
  return *reinterpret_cast<volatile long long*>(&ht.sync(ht.comm.rank)->epoch) + 1;
}

// Block-wide: returns the call's epoch to every thread; block 0 announces arrival at every rank.
__device__ __forceinline__ long long begin_call(const HtDevice& ht) {
  __shared__ long long s_epoch;
  if (threadIdx.x == 0) s_epoch = read_call_epoch(ht);
  __syncthreads();
  const long long epoch = s_epoch;
  if (blockIdx.x == 0 && threadIdx.x < static_cast<unsigned>(ht.comm.num_ranks)) {
    dev::st_release_sys(&ht.sync(threadIdx.x)->arrive[ht.comm.rank], epoch);
  }
  return epoch;
}

// Block-wide, at the very end of the kernel: the last block to finish publishes the epoch for the next
// call. Returns true in thread 0 of that last block (for end-of-call work such as error records).
__device__ __forceinline__ bool end_call(const HtDevice& ht, long long epoch) {
  __syncthreads();
  bool last = false;
  if (threadIdx.x == 0) {
    HtSync* sync = ht.sync(ht.comm.rank);
    __threadfence();
    const int done = atomicAdd(&sync->blocks_done, 1);
    if (done == static_cast<int>(gridDim.x) - 1) {
      sync->blocks_done = 0;
      *reinterpret_cast<volatile long long*>(&sync->epoch) = epoch;
      __threadfence();
      last = true;
    }
  }
  return last;
}

// Waits (this thread) for *flag >= target. Polls first with relaxed loads and a short back-off, which do not
// invalidate the SM's L1 the way every acquire load does (a storm of acquire polls from many waiting warps
// slows the whole SM down), then finishes with the bounded acquire wait of wait.cuh, which returns at once
// when the flag is already there and supplies the acquire ordering (and the timeout / error record).
__device__ __forceinline__ bool wait_flag_geq(const DeviceComm& comm, const long long* flag, long long target,
                                              Phase phase, int peer) {
  constexpr int kRelaxedPolls = 1 << 16;
  for (int i = 0; i < kRelaxedPolls; ++i) {
    if (dev::ld_relaxed_sys(flag) >= target) break;
    if ((i & 1023) == 1023 && dev::error_recorded(comm)) break;
    if (i >= 16) __nanosleep(64);
  }
  return dev::wait_geq(comm, flag, target, phase, peer);
}

// Lane 0 waits for *flag >= target; the result reaches every lane, and the warp barrier orders the
// lanes' later loads after lane 0's acquire.
__device__ __forceinline__ bool warp_wait_geq(const DeviceComm& comm, const long long* flag, long long target,
                                              Phase phase, int peer, int lane) {
  int ok = 1;
  if (lane == 0) ok = wait_flag_geq(comm, flag, target, phase, peer) ? 1 : 0;
  ok = __shfl_sync(kFullMask, ok, 0);
  __syncwarp();
  return ok != 0;
}

// Copies n16 16-byte words from src to dst with the whole warp, kUnroll loads in flight per lane (4 keeps
// the 1024-thread kernels within 64 registers without spills).
// kNcSource: src is the caller's read-only input (non-coherent path); else src may have been written by a
// peer during this kernel (read after an acquire, coherent loads). Stores do not allocate in L1.
template <bool kNcSource, int kUnroll = 4>
__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int n16, int lane) {
  for (int i = lane; i < n16; i += kUnroll * 32) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * 32 < n16) v[u] = kNcSource ? dev::ld_nc_v4(src + i + u * 32) : dev::ld_v4(src + i + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * 32 < n16) dev::st_na_v4(dst + i + u * 32, v[u]);
  }
}

__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) >> 5; }

}  // namespace ht
}  // namespace nccl_moe
