// What the scale-out transport's GPU tests (transport_litmus_test.cu: IBGDA, transport_proxy_test.cu: the request
// proxy, transport_world_litmus_test.cu: the put_signal litmus over 2x1 / 2x2 / 4x1 worlds in both modes) add to the
// one-GPU transport world of tests/harness/transport_world.h (shared with moe-perf's transport mode): GoogleTest
// assertion macros, the litmus knobs (MOE_LITMUS_ITERATIONS: a world's total iterations; the chaos seed these tests
// always run with), the litmus size distribution and the fill bytes of the ordering tests.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "harness/transport_world.h"
#include "transport/emulated/chaos.h"

namespace nccl_moe::transport_test {

using namespace nccl_moe::transport_world;  // NOLINT(build/namespaces): the world the tests run in

inline constexpr uint64_t kMaxLitmusBytes = 4ull << 20;
inline constexpr uint64_t kDefaultChaosSeed = 0x6a7e5eedull;

#define CUDA_OK(call)                                                                                             \
  do {                                                                                                            \
    const cudaError_t e_ = (call);                                                                                \
    ASSERT_EQ(cudaSuccess, e_) << #call << ": " << cudaGetErrorName(e_) << " (" << cudaGetErrorString(e_) << ")"; \
  } while (0)
#define NCCL_OK(call)                                                             \
  do {                                                                            \
    const ncclResult_t r_ = (call);                                               \
    ASSERT_EQ(ncclSuccess, r_) << #call << ": " << ::nccl_moe::threadLastError(); \
  } while (0)

inline uint64_t litmusIterations(uint64_t fallback) {
  const char* v = std::getenv("MOE_LITMUS_ITERATIONS");
  if (v == nullptr || *v == '\0') return fallback;
  const unsigned long long n = std::strtoull(v, nullptr, 10);
  return n > 0 ? n : fallback;
}

inline uint64_t testChaosSeed() {
  const uint64_t s = em::chaosSeedFromEnvironment();
  return s != 0 ? s : kDefaultChaosSeed;
}

// Log-uniform in [1, 4 MB): a power of two 2^e (e in 0..21) plus a uniform part below it.
__host__ __device__ inline uint32_t litmusBytes(uint64_t seed, uint64_t iter) {
  const uint64_t r = mix64(seed * 0x2545f4914f6cdd1dull + iter);
  const uint32_t e = static_cast<uint32_t>(r % 22);
  const uint64_t base = 1ull << e;
  return static_cast<uint32_t>(base + (r >> 8) % base);
}
// The fill byte of try t of the ordering tests: never 0 (fresh buffers) and different from try t - 1's.
__host__ __device__ inline uint8_t tryByte(uint64_t t) { return static_cast<uint8_t>(1 + t % 251); }
__host__ __device__ inline uint64_t tryWord(uint64_t t) { return 0x0101010101010101ull * tryByte(t); }

__device__ inline void fillBytes(uint8_t* p, uint32_t bytes, uint8_t v) {
  uint64_t* p64 = reinterpret_cast<uint64_t*>(p);
  const uint64_t w = 0x0101010101010101ull * v;
  for (uint32_t i = threadIdx.x; i < bytes / 8; i += blockDim.x) p64[i] = w;
  if (threadIdx.x == 0)
    for (uint32_t j = bytes / 8 * 8; j < bytes; ++j) p[j] = v;
}

#define WORLD_OR_SKIP(world, seed)                                                          \
  do {                                                                                      \
    const std::string why_ = makeWorld((seed), &(world));                                   \
    if (why_ == "skip") GTEST_SKIP() << "no CUDA GPU: the transport litmus tests need one"; \
    ASSERT_EQ("", why_);                                                                    \
  } while (0)

}  // namespace nccl_moe::transport_test
