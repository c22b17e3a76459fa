// Permutation kernels of the NCCL all-to-all baseline (contract in baseline_kernels.h).
// Launch shape: one block of 256 threads per row (grid-stride over rows, at most 4096 blocks); the threads of a
// block stride over the row's vectors (copyRows) or channels (reduceRows), so global accesses are coalesced.
#include <cuda_bf16.h>

#include "baseline_kernels.h"
#include "device/ptx.cuh"

namespace nccl_moe::perf {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

template <typename Vec>
__global__ void copyRowsKernel(char* dst, const int* dst_rows, const char* src, const int* src_rows, int num_rows,
                               size_t row_bytes) {
  const size_t vecs = row_bytes / sizeof(Vec);
  for (int i = blockIdx.x; i < num_rows; i += gridDim.x) {
    const size_t d = dst_rows ? static_cast<size_t>(dst_rows[i]) : static_cast<size_t>(i);
    const size_t s = src_rows ? static_cast<size_t>(src_rows[i]) : static_cast<size_t>(i);
    const Vec* in = reinterpret_cast<const Vec*>(src + s * row_bytes);
    Vec* out = reinterpret_cast<Vec*>(dst + d * row_bytes);
    for (size_t v = threadIdx.x; v < vecs; v += blockDim.x) out[v] = in[v];
  }
}

__global__ void reduceRowsKernel(uint16_t* out, const uint16_t* in, const int* rows, const float* weights,
                                 int num_tokens, int fan_in, int hidden, const int* groups, int num_groups) {
  for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
      float acc = 0.0f;
      if (groups != nullptr) {
        for (int g = 0; g < num_groups; ++g) {
          float part = 0.0f;
          bool any = false;
          for (int m = 0; m < fan_in; ++m) {
            const int row = rows[static_cast<size_t>(t) * fan_in + m];
            if (row < 0 || groups[static_cast<size_t>(t) * fan_in + m] != g) continue;
            const float v = __uint_as_float(static_cast<uint32_t>(in[static_cast<size_t>(row) * hidden + c]) << 16);
            part = __fmaf_rn(weights[static_cast<size_t>(t) * fan_in + m], v, part);
            any = true;
          }
          if (any) acc = __fadd_rn(acc, __bfloat162float(__float2bfloat16_rn(part)));
        }
        out[static_cast<size_t>(t) * hidden + c] = __bfloat16_as_ushort(__float2bfloat16_rn(acc));
        continue;
      }
      for (int m = 0; m < fan_in; ++m) {
        const int row = rows[static_cast<size_t>(t) * fan_in + m];
        if (row < 0) continue;
        const float v = __uint_as_float(static_cast<uint32_t>(in[static_cast<size_t>(row) * hidden + c]) << 16);
        acc = weights ? __fadd_rn(acc, __fmul_rn(weights[static_cast<size_t>(t) * fan_in + m], v)) : __fadd_rn(acc, v);
      }
      out[static_cast<size_t>(t) * hidden + c] = __bfloat16_as_ushort(__float2bfloat16_rn(acc));
    }
  }
}

int blocksFor(int rows) { return rows < kMaxBlocks ? rows : kMaxBlocks; }

}  // namespace

cudaError_t copyRows(void* dst, const int* dst_rows, const void* src, const int* src_rows, int num_rows,
                     size_t row_bytes, cudaStream_t stream) {
  if (num_rows <= 0 || row_bytes == 0) return cudaSuccess;
  const uintptr_t bases = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  if (row_bytes % 16 == 0 && bases % 16 == 0) {
    copyRowsKernel<int4><<<blocksFor(num_rows), kThreads, 0, stream>>>(d, dst_rows, s, src_rows, num_rows, row_bytes);
  } else if (row_bytes % 4 == 0 && bases % 4 == 0) {
    copyRowsKernel<int><<<blocksFor(num_rows), kThreads, 0, stream>>>(d, dst_rows, s, src_rows, num_rows, row_bytes);
  } else {
    copyRowsKernel<char><<<blocksFor(num_rows), kThreads, 0, stream>>>(d, dst_rows, s, src_rows, num_rows, row_bytes);
  }
  return cudaGetLastError();
}

cudaError_t reduceRows(uint16_t* out, const uint16_t* in, const int* rows, const float* weights, int num_tokens,
                       int fan_in, int hidden, cudaStream_t stream, const int* groups, int num_groups) {
  if (num_tokens <= 0) return cudaSuccess;
  reduceRowsKernel<<<blocksFor(num_tokens), kThreads, 0, stream>>>(out, in, rows, weights, num_tokens, fan_in, hidden,
                                                                   groups, num_groups);
  return cudaGetLastError();
}

namespace {
__global__ void holdKernel(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

// One warp: lane 0 holds, then lane r (r < R, strided) posts `epoch` into rank r's word `me` and waits for rank
// r's post into this rank's word r.
__global__ void holdAndMeetKernel(unsigned long long ns, long long* const* peers, long long* flags, int me,
                                  int num_ranks, long long epoch, unsigned long long timeout_ns, int* timed_out) {
  if (threadIdx.x == 0) {
    const unsigned long long start = dev::globaltimer_ns();
    while (dev::globaltimer_ns() - start < ns) {
    }
  }
  __syncwarp();
  for (int r = static_cast<int>(threadIdx.x); r < num_ranks; r += 32) dev::st_release_sys(peers[r] + me, epoch);
  const unsigned long long start = dev::globaltimer_ns();
  for (int r = static_cast<int>(threadIdx.x); r < num_ranks; r += 32) {
    while (dev::ld_acquire_sys(flags + r) < epoch) {
      if (dev::globaltimer_ns() - start > timeout_ns) {
        atomicExch(timed_out, 1);
        return;
      }
    }
  }
}
}  // namespace

cudaError_t holdStream(int microseconds, cudaStream_t stream) {
  holdKernel<<<1, 1, 0, stream>>>(static_cast<unsigned long long>(microseconds) * 1000ull);
  return cudaGetLastError();
}

cudaError_t holdAndMeet(int microseconds, long long* const* peers, long long* flags, int me, int num_ranks,
                        long long epoch, double timeout_s, int* timed_out, cudaStream_t stream) {
  holdAndMeetKernel<<<1, 32, 0, stream>>>(static_cast<unsigned long long>(microseconds) * 1000ull, peers, flags, me,
                                          num_ranks, epoch, static_cast<unsigned long long>(timeout_s * 1e9),
                                          timed_out);
  return cudaGetLastError();
}

}  // namespace nccl_moe::perf
