// Data helpers of the high-throughput GPU tests (the worlds, barrier and device buffers are tests/gpu/gpu_world.h
// and tests/harness/). The CPU reference (src/reference/reference.h) is the oracle: inputs are generated from it
// (src/reference/testing/) and results are compared with it bitwise.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gpu_world.h"
#include "nccl_moe.h"
#include "reference/reference.h"

namespace ht_test {

namespace ref = nccl_moe::ref;

#define HT_CUDA_OK(x) ASSERT_EQ(cudaSuccess, (x)) << #x << ": " << cudaGetErrorString(cudaGetLastError())
#define HT_MOE_OK(comm, x) ASSERT_EQ(ncclSuccess, (x)) << #x << ": " << ncclMoeGetLastError(comm)

using gpu_test::Placement;
using gpu_test::World;
using harness::DeviceBytes;

inline std::vector<int32_t> toInt32(const std::vector<int64_t>& v) { return std::vector<int32_t>(v.begin(), v.end()); }

// Scales of fp8 rows laid out with the caller strides (in 4-byte words) the dispatch accepts.
inline std::vector<int32_t> stridedScales(const ref::Rows& rows, int64_t token_stride, int64_t word_stride) {
  const bool ue8m0 = rows.scale_format == ref::ScaleFormat::kUe8m0;
  const int words = ue8m0 ? ref::num_packed_scales(rows.hidden) : ref::num_scale_groups(rows.hidden);
  const int64_t ts = token_stride > 0 ? token_stride : words, ws = word_stride > 0 ? word_stride : 1;
  const size_t size = rows.num_rows == 0 ? 0 : static_cast<size_t>((rows.num_rows - 1) * ts + (words - 1) * ws + 1);
  std::vector<int32_t> out(size, 0x7f7f7f7f);
  for (int t = 0; t < rows.num_rows; ++t)
    for (int w = 0; w < words; ++w) {
      int32_t v;
      if (ue8m0)
        v = rows.packed_scales[static_cast<size_t>(t) * words + w];
      else
        std::memcpy(&v, &rows.scales[static_cast<size_t>(t) * words + w], 4);
      out[static_cast<size_t>(t * ts + w * ws)] = v;
    }
  return out;
}

// First index where a and b differ, or -1.
template <typename T>
long long firstDiff(const T* a, const T* b, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<long long>(i);
  return -1;
}

}  // namespace ht_test
