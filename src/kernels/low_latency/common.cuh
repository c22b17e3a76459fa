// Device helpers shared by the low-latency dispatch and combine kernels: launch shape, the last-block
// arrival used to publish flags once every block of a grid is done, warp scans, bf16 packing, and the
// in-kernel FP8 cast of one 16-channel chunk (bit-identical to ref::cast_row_to_fp8).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "device/device_comm.h"
#include "device/ptx.cuh"
#include "device/wait.cuh"
#include "mem/ll_layout.h"

namespace nccl_moe {
namespace ll {

constexpr int kThreads = 512;  // threads per block of every LL kernel (16 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 2;  // LL is latency-bound: two blocks per SM keep more work items in flight

// Grid of an LL kernel: every block must be resident at once (blocks wait for each other's flags through the
// peers), so num_sms times the blocks per SM the kernel really achieves (at most kBlocksPerSm).
template <auto kKernel>
inline int grid_blocks(int num_sms) {
  static const int per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 1;
    }
    return n < 1 ? 1 : (n > kBlocksPerSm ? kBlocksPerSm : n);
  }();
  return num_sms * per_sm;
}
static_assert(kLlMaxRanks >= kMaxRanks, "LL control arrays must hold every rank");
static_assert(kLlMaxTopk >= kMaxTopk, "LL header must hold every top-k slot");

// Where one rank's half `half_offset` bytes into its buffer lives, as mapped in this process.
__device__ __forceinline__ uint8_t* half_of(const DeviceComm& comm, int rank, size_t half_offset) {
  return comm.peer_buffer[rank] + half_offset;
}

// Called by every thread of every block once the block's work (stores included) is done. Returns true in
// exactly one block, the last to arrive, after every other block's prior accesses are ordered before it (each
// block fences before it arrives, so the last block may publish them to peers with a release store). `sys`:
// fence at system scope (the blocks stored into peers' memory); otherwise at gpu scope (only local stores:
// the last block's own system-scope release then carries the chain to the peers). The counter is back at 0
// afterwards (it is only reused by a later kernel).
__device__ __forceinline__ bool arrive_last_block(int* counter, bool sys) {
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    if (sys)
      dev::fence_acq_rel_sys();
    else
      dev::fence_acq_rel_gpu();
    const int old = dev::atom_add_acq_rel_gpu(counter, 1);
    s_last = (old == static_cast<int>(gridDim.x) - 1);
    if (s_last) *counter = 0;
  }
  __syncthreads();
  return s_last != 0;
}

// Share of kLlArrivalUnits of block b among n arriving blocks (0 <= b < n <= 4095): the n shares sum to
// kLlArrivalUnits, whatever n, so the counter's target does not depend on the peer's grid. 32-bit math (a
// 64-bit division is a call that makes the kernels spill).
__device__ __forceinline__ long long arrival_share(int b, int n) {
  static_assert(kLlArrivalUnits * 4095 <= 0xffffffffll, "32-bit share math");
  const uint32_t u = static_cast<uint32_t>(kLlArrivalUnits), nn = static_cast<uint32_t>(n);
  const uint32_t bb = static_cast<uint32_t>(b);
  return static_cast<long long>((bb + 1) * u / nn - bb * u / nn);
}

// Inclusive warp scan of v.
__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = dev::lane_id();
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += u;
  }
  return v;
}

__device__ __forceinline__ void bf16x8_to_float(const int4& v, float (&f)[8]) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ int4 float8_to_bf16x8(const float (&f)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);  // .x = low half
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// Scale of one 128-channel group (ref::fp8_group_scale): max(amax, 1e-4) / 448, rounded up to a power of two
// for the pow2 / ue8m0 formats (format != 0).
__device__ __forceinline__ float fp8_group_scale(float amax, int format) {
  const float scale = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
  if (format == 0) return scale;
  uint32_t bits = __float_as_uint(scale);
  if (bits & 0x7fffffu) bits = (bits & 0xff800000u) + 0x800000u;
  return __uint_as_float(bits);
}

// Casts 16 consecutive bf16 channels (two int4) with `inv` = 1 / scale: q = e4m3_satfinite_rne(x * inv).
__device__ __forceinline__ int4 cast_16_to_fp8(const float (&f)[16], float inv) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(
        make_float2(__fmul_rn(f[4 * i], inv), __fmul_rn(f[4 * i + 1], inv)), __NV_SATFINITE, __NV_E4M3);
    const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
        make_float2(__fmul_rn(f[4 * i + 2], inv), __fmul_rn(f[4 * i + 3], inv)), __NV_SATFINITE, __NV_E4M3);
    w[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

__device__ __forceinline__ int64_t load_expert_id(const void* topk_idx, int idx_int32, size_t i) {
  return idx_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(topk_idx)[i])
                   : static_cast<const int64_t*>(topk_idx)[i];
}

}  // namespace ll
}  // namespace nccl_moe
