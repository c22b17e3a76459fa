// Bit-exact numerics shared by every kernel that converts values: bf16 unpack/pack, the FP8 scale of a
// 128-channel group and the e4m3 cast. Each function is bit-identical to its CPU reference counterpart
// (src/reference/reference.h), which is what lets the tests demand bitwise equality.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace nccl_moe {
namespace dev {

// bf16 bits -> float (exact): the low / high half of a 32-bit word of two bf16 values.
__device__ __forceinline__ float bf16_lo_to_float(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi_to_float(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// Four bf16 values (8 bytes) -> float.
__device__ __forceinline__ void bf16x4_to_float(const uint2& v, float (&f)[4]) {
  f[0] = bf16_lo_to_float(v.x);
  f[1] = bf16_hi_to_float(v.x);
  f[2] = bf16_lo_to_float(v.y);
  f[3] = bf16_hi_to_float(v.y);
}

// Eight bf16 values (16 bytes) -> float.
__device__ __forceinline__ void bf16x8_to_float(const int4& v, float (&f)[8]) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = bf16_lo_to_float(w[i]);
    f[2 * i + 1] = bf16_hi_to_float(w[i]);
  }
}

// Eight floats -> eight bf16 values (16 bytes), round to nearest even (ref::float_to_bf16).
__device__ __forceinline__ int4 float8_to_bf16x8(const float (&f)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);  // .x = low half
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// Scale of one 128-channel group from its amax (ref::fp8_group_scale): max(amax, 1e-4) / 448, rounded up to a
// power of two (mantissa bits set: exponent + 1, mantissa cleared) for the pow2 and ue8m0 formats
// (`format` = ncclMoeScaleFormat_t: 0 float, 1 float pow2, 2 ue8m0).
__device__ __forceinline__ float fp8_group_scale(float amax, int format) {
  const float scale = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
  if (format == 0) return scale;
  uint32_t bits = __float_as_uint(scale);
  if (bits & 0x7fffffu) bits = (bits & 0xff800000u) + 0x800000u;
  return __uint_as_float(bits);
}

// The multiplier of the cast: 1 / scale, correctly rounded (one FP32 multiply per value follows, no FMA).
__device__ __forceinline__ float fp8_inv_scale(float scale) { return __fdiv_rn(1.0f, scale); }

// UE8M0 byte of a power-of-two scale: its biased exponent (scale == 2^(b - 127)).
__device__ __forceinline__ uint32_t ue8m0_byte(float pow2_scale) { return (__float_as_uint(pow2_scale) >> 23) & 0xffu; }

// Two values -> two e4m3 bytes (low byte = a): e4m3_satfinite_rne(x * inv) (ref::float_to_fp8_e4m3).
__device__ __forceinline__ uint32_t cast2_to_fp8(float a, float b, float inv) {
  return static_cast<uint32_t>(
      __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(a, inv), __fmul_rn(b, inv)), __NV_SATFINITE, __NV_E4M3));
}

// Four values -> four e4m3 bytes in one word (byte i = value i).
__device__ __forceinline__ uint32_t cast4_to_fp8(const float (&f)[4], float inv) {
  return cast2_to_fp8(f[0], f[1], inv) | (cast2_to_fp8(f[2], f[3], inv) << 16);
}

// Sixteen consecutive values -> sixteen e4m3 bytes (16 bytes).
__device__ __forceinline__ int4 cast16_to_fp8(const float (&f)[16], float inv) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = cast2_to_fp8(f[4 * i], f[4 * i + 1], inv) | (cast2_to_fp8(f[4 * i + 2], f[4 * i + 3], inv) << 16);
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

}  // namespace dev
}  // namespace nccl_moe
