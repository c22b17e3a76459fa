// BF16 -> FP8 e4m3 cast with per-128-channel scales (ncclMoeCastToFp8). Local, stream-ordered.
//
// For each row t and group g (channels [128g, min(128g + 128, H))), bit-identical to ref::cast_row_to_fp8:
//   amax = max_c |float(x[t][c])| (from 0.0f);  a = max(amax, 1e-4f);  scale = a / 448.0f
//   FloatPow2 / Ue8m0: scale rounded up to a power of two (mantissa bits set -> exponent + 1, mantissa 0)
//   q[t][c] = e4m3_satfinite_rn(float(x[t][c]) * (1.0f / scale))          (one FP32 multiply, no FMA)
// Scales out: Float / FloatPow2: float [T, G]; Ue8m0: int32 [T, ceil(G/4)], byte g%4 of word g/4 holds the
// biased exponent of group g (unused high bytes 0).
//
// Launch: one warp per (row, word of four groups); lane l handles channels 4l .. 4l+3 of each group
// (H % 16 == 0, so a 4-channel chunk is either inside the row or past its end).
#include <cuda_runtime.h>

#include "device/numerics.cuh"
#include "kernels/cast/cast.h"
#include "nccl_moe.h"

namespace nccl_moe {
namespace {

constexpr int kCastThreads = 256;

__global__ void __launch_bounds__(kCastThreads) cast_kernel(const __grid_constant__ CastArgs a) {
  const int lane = threadIdx.x & 31;
  const long long warps_total = static_cast<long long>(a.num_tokens) * a.num_words;
  const long long stride = static_cast<long long>(gridDim.x) * (kCastThreads / 32);
  for (long long w = (static_cast<long long>(blockIdx.x) * kCastThreads + threadIdx.x) / 32; w < warps_total;
       w += stride) {
    const int t = static_cast<int>(w / a.num_words), word = static_cast<int>(w % a.num_words);
    const uint16_t* xr = a.x + static_cast<size_t>(t) * a.hidden;
    uint8_t* qr = a.out + static_cast<size_t>(t) * a.hidden;
    unsigned packed = 0;
    for (int i = 0; i < 4; ++i) {
      const int g = word * 4 + i;
      if (g >= a.num_groups) break;
      const int c = g * 128 + lane * 4;
      const bool in = c < a.hidden;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (in) {
        dev::bf16x4_to_float(*reinterpret_cast<const uint2*>(xr + c), v);
      }
      float amax = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(v[j]));
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      const float scale = dev::fp8_group_scale(amax, a.format);
      if (in) *reinterpret_cast<unsigned*>(qr + c) = dev::cast4_to_fp8(v, dev::fp8_inv_scale(scale));
      if (lane == 0) {
        if (a.format == ncclMoeScaleUe8m0)
          packed |= dev::ue8m0_byte(scale) << (8 * i);
        else
          a.out_scales[static_cast<size_t>(t) * a.num_groups + g] = scale;
      }
    }
    if (lane == 0 && a.format == ncclMoeScaleUe8m0)
      a.out_packed[static_cast<size_t>(t) * a.num_words + word] = static_cast<int>(packed);
  }
}

}  // namespace

cudaError_t launchCast(const CastArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  const long long warps = static_cast<long long>(a.num_tokens) * a.num_words;
  const long long blocks_needed = (warps * 32 + kCastThreads - 1) / kCastThreads;
  const int blocks = static_cast<int>(blocks_needed < 65535 ? blocks_needed : 65535);
  cast_kernel<<<blocks, kCastThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadCastKernels() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, cast_kernel);
}

}  // namespace nccl_moe
