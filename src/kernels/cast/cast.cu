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
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "core/ops.h"
#include "core/error.h"

namespace nccl_moe {
namespace {

constexpr int kCastThreads = 256;

struct CastArgs {
  const uint16_t* x;
  int num_tokens;
  int hidden;
  int num_groups;
  int num_words;  // ceil(groups / 4)
  int format;     // ncclMoeScaleFormat_t
  uint8_t* out;
  float* out_scales;   // float formats
  int* out_packed;     // ue8m0
};

__device__ __forceinline__ float group_scale(float amax, int format) {
  const float a = fmaxf(amax, 1e-4f);
  float scale = __fdiv_rn(a, 448.0f);
  if (format != ncclMoeScaleFloat) {
    unsigned b = __float_as_uint(scale);
    if (b & 0x7fffffu) b = (b + 0x800000u) & ~0x7fffffu;
    scale = __uint_as_float(b);
  }
  return scale;
}

__global__ void __launch_bounds__(kCastThreads) cast_kernel(const __grid_constant__ CastArgs a) {
  const int lane = threadIdx.x & 31;
  const long long warps_total = static_cast<long long>(a.num_tokens) * a.num_words;
  const long long stride = static_cast<long long>(gridDim.x) * (kCastThreads / 32);
  for (long long w = (static_cast<long long>(blockIdx.x) * kCastThreads + threadIdx.x) / 32; w < warps_total; w += stride) {
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
        const uint2 raw = *reinterpret_cast<const uint2*>(xr + c);
        v[0] = __uint_as_float(raw.x << 16);
        v[1] = __uint_as_float(raw.x & 0xffff0000u);
        v[2] = __uint_as_float(raw.y << 16);
        v[3] = __uint_as_float(raw.y & 0xffff0000u);
      }
      float amax = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(v[j]));
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      const float scale = group_scale(amax, a.format);
      const float inv = __frcp_rn(scale);
      if (in) {
        unsigned q = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const unsigned byte = __nv_cvt_float_to_fp8(__fmul_rn(v[j], inv), __NV_SATFINITE, __NV_E4M3);
          q |= byte << (8 * j);
        }
        *reinterpret_cast<unsigned*>(qr + c) = q;
      }
      if (lane == 0) {
        if (a.format == ncclMoeScaleUe8m0)
          packed |= ((__float_as_uint(scale) >> 23) & 0xffu) << (8 * i);
        else
          a.out_scales[static_cast<size_t>(t) * a.num_groups + g] = scale;
      }
    }
    if (lane == 0 && a.format == ncclMoeScaleUe8m0)
      a.out_packed[static_cast<size_t>(t) * a.num_words + word] = static_cast<int>(packed);
  }
}

}  // namespace

ncclResult_t opCastToFp8(const void* x, int num_tokens, int hidden, ncclMoeScaleFormat_t format, void* out_fp8,
                         void* out_scales, cudaStream_t stream) {
  CastArgs a{};
  a.x = static_cast<const uint16_t*>(x);
  a.num_tokens = num_tokens;
  a.hidden = hidden;
  a.num_groups = (hidden + 127) / 128;
  a.num_words = (a.num_groups + 3) / 4;
  a.format = static_cast<int>(format);
  a.out = static_cast<uint8_t*>(out_fp8);
  a.out_scales = static_cast<float*>(out_scales);
  a.out_packed = static_cast<int*>(out_scales);
  if (num_tokens == 0) return ncclSuccess;
  const long long warps = static_cast<long long>(num_tokens) * a.num_words;
  const long long blocks_needed = (warps * 32 + kCastThreads - 1) / kCastThreads;
  const int blocks = static_cast<int>(blocks_needed < 65535 ? blocks_needed : 65535);
  cast_kernel<<<blocks, kCastThreads, 0, stream>>>(a);
  MOE_CUDA_CHECK(cudaGetLastError());
  return ncclSuccess;
}

}  // namespace nccl_moe
