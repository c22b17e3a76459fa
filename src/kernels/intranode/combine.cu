// High-throughput intranode combine (ncclMoeCombine): the reverse of the dispatch recorded in the handle.
//
// Computes, on every home rank s, for every token t < T_s and channel c (FP32, this exact order):
//   acc = 0.0f;  for d = 0 .. R-1 ascending with p = send_pos[t][d] >= 0:  acc = acc + float(x_d[recv_prefix_d[s] +
//   p][c]) if bias_0: acc = acc + float(bias_0[t][c]);  if bias_1: acc = acc + float(bias_1[t][c]) combined_x[t][c] =
//   bf16_rn(acc)
// and with topk_weights: combined_topk_weights[t][k] = 0.0f + w_d0[row][k] + w_d1[row][k] + ... (same d order).
// This is the reference's contract (src/reference/reference.h, ht_combine), so results are bitwise equal.
//
// Buffer regions (src/mem/ht_layout.h), on home rank s: x[d][p] (the row rank d returns for its p-th row from
// s), meta[d][p] words [K, 2K) (weights), row_flag[d][p]; arrive[] in HtSync.
//
// Roles: grid = num_sms blocks of kHtThreads threads; by default warps [0, send_warps = 16) of each block are
// SENDERS, the others REDUCERS (htCombineSendWarps); HtTuning::combine_send_blocks selects a block split.
//   sender warp w (global index) takes items w, w + W, ...; item i = (p = i / (R-1), home s = r + 1 + i % (R-1)
//     mod R): row recv_prefix[s] + p of this rank's combine input goes to s's x[r][p] (and weights to
//     meta[r][p]), then s's row_flag[r][p] = epoch (warp barrier, release, system scope). Before its first
//     store into s's region it waits arrive[s] >= epoch.
//   reducer warp w takes tokens t = w, w + W', ...: lane d waits row_flag[d][send_pos[t][d]] >= epoch for each
//     remote d holding t, then the warp sums the rows (this rank's own contribution is read straight from the
//     combine input, no copy) and the biases, and writes the bf16 row. Tokens are visited in ascending order,
//     like the senders' positions, so reduction follows the data as it arrives.
// Every wait is bounded (wait.cuh); a warp whose wait fails stops and the kernel ends with the error recorded.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/intranode/args.h"
#include "kernels/intranode/common.cuh"
#include "kernels/intranode/tuning.h"

namespace nccl_moe {
namespace ht {
namespace {

__device__ void run_sender(const CombineArgs& a, long long epoch, int sw, int num_sw, int lane) {
  const HtDevice& ht = a.ht;
  const int R = ht.comm.num_ranks, rank = ht.comm.rank, peers = R - 1;
  if (peers == 0) return;
  int max_count = 0;
  for (int s = 0; s < R; ++s)
    if (s != rank) max_count = max(max_count, __ldg(a.recv_prefix + s + 1) - __ldg(a.recv_prefix + s));
  const int total = max_count * peers;
  const int n16 = a.row_bytes / 16, K = a.topk;
  unsigned arrived = 0;
  for (int i = sw; i < total; i += num_sw) {
    const int pos = i / peers;
    int s = rank + 1 + (i - pos * peers);
    if (s >= R) s -= R;
    const int base = __ldg(a.recv_prefix + s);
    if (pos >= __ldg(a.recv_prefix + s + 1) - base) continue;
    if (!((arrived >> s) & 1u)) {
      if (!warp_wait_geq(ht.comm, &ht.sync(rank)->arrive[s], epoch, Phase::kHtCombine, s, lane)) return;
      arrived |= 1u << s;
    }
    const int row = base + pos;
    if (row < a.in_rows) {
      warp_copy<true>(reinterpret_cast<int4*>(ht.x(s, rank, pos, a.row_bytes)),
                      reinterpret_cast<const int4*>(a.x + static_cast<size_t>(row) * a.row_bytes), n16, lane);
      if (a.topk_weights != nullptr && lane < K)
        ht.meta(s, rank, pos)[K + lane] = __float_as_int(__ldg(a.topk_weights + static_cast<size_t>(row) * K + lane));
    }
    __syncwarp();
    if (lane == 0) dev::st_release_sys(ht.row_flag(s, rank, pos), epoch);
  }
}

__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = acc[2 * i] + __uint_as_float(w[i] << 16);
    acc[2 * i + 1] = acc[2 * i + 1] + __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    w[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]), static_cast<int>(w[3]));
}

// Sums one token's rows. pos[d] >= 0 where rank d holds the token. kRanks >= R (compile-time bound); kBias:
// biases may be present. Each lane keeps (kRanks + 2*kBias) * kCols 16-byte loads in flight.
template <int kRanks, bool kBias>
__device__ __forceinline__ void reduce_token(const CombineArgs& a, int t, const int (&pos)[kRanks], int lane) {
  constexpr int kSources = kRanks + (kBias ? 2 : 0);
  constexpr int kCols = kSources >= 8 ? 1 : 8 / kSources;
  const HtDevice& ht = a.ht;
  const int rank = ht.comm.rank;
  const int n16 = a.row_bytes / 16;
  const int own_base = __ldg(a.recv_prefix + rank);
  const int4* row_ptr[kRanks];
#pragma unroll
  for (int d = 0; d < kRanks; ++d) {
    row_ptr[d] = nullptr;
    if (pos[d] >= 0) {
      row_ptr[d] = d == rank ? reinterpret_cast<const int4*>(a.x + static_cast<size_t>(own_base + pos[d]) * a.row_bytes)
                             : reinterpret_cast<const int4*>(ht.x(rank, d, pos[d], a.row_bytes));
    }
  }
  const int4* b0 =
      kBias && a.bias0 != nullptr ? reinterpret_cast<const int4*>(a.bias0) + static_cast<size_t>(t) * n16 : nullptr;
  const int4* b1 =
      kBias && a.bias1 != nullptr ? reinterpret_cast<const int4*>(a.bias1) + static_cast<size_t>(t) * n16 : nullptr;
  int4* out = reinterpret_cast<int4*>(a.out) + static_cast<size_t>(t) * n16;
  const int4 zero = make_int4(0, 0, 0, 0);

  for (int c0 = lane; c0 < n16; c0 += 32 * kCols) {
    int4 v[kRanks][kCols];
    int4 vb[2][kCols];
#pragma unroll
    for (int d = 0; d < kRanks; ++d) {
#pragma unroll
      for (int u = 0; u < kCols; ++u) {
        const int c = c0 + u * 32;
        v[d][u] = zero;
        if (row_ptr[d] != nullptr && c < n16)
          v[d][u] = d == rank ? dev::ld_nc_v4(row_ptr[d] + c) : dev::ld_v4(row_ptr[d] + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kCols; ++u) {
      const int c = c0 + u * 32;
      vb[0][u] = zero;
      vb[1][u] = zero;
      if (kBias && c < n16) {
        if (b0 != nullptr) vb[0][u] = dev::ld_nc_v4(b0 + c);
        if (b1 != nullptr) vb[1][u] = dev::ld_nc_v4(b1 + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kCols; ++u) {
      const int c = c0 + u * 32;
      if (c >= n16) break;
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
#pragma unroll
      for (int d = 0; d < kRanks; ++d)
        if (row_ptr[d] != nullptr) add_bf16x8(acc, v[d][u]);
      if (kBias) {
        if (b0 != nullptr) add_bf16x8(acc, vb[0][u]);
        if (b1 != nullptr) add_bf16x8(acc, vb[1][u]);
      }
      dev::st_na_v4(out + c, pack_bf16x8(acc));
    }
  }
}

template <int kRanks, bool kBias>
__device__ void run_reducer(const CombineArgs& a, long long epoch, int rw, int num_rw, int lane) {
  const HtDevice& ht = a.ht;
  const int R = ht.comm.num_ranks, rank = ht.comm.rank, K = a.topk;
  const int own_base = __ldg(a.recv_prefix + rank);
  for (int t = rw; t < a.num_tokens; t += num_rw) {
    int p = -1;
    if (lane < R) p = __ldg(a.send_pos + static_cast<size_t>(t) * R + lane);
    if (lane == rank && p >= 0 && own_base + p >= a.in_rows) p = -1;  // only after a capacity error
    bool ok = true;
    if (lane < R && lane != rank && p >= 0)
      ok = wait_flag_geq(ht.comm, ht.row_flag(rank, lane, p), epoch, Phase::kHtCombine, lane);
    if (!__all_sync(kFullMask, ok)) return;
    __syncwarp();
    int pos[kRanks];
#pragma unroll
    for (int d = 0; d < kRanks; ++d) pos[d] = __shfl_sync(kFullMask, p, d);
#pragma unroll
    for (int d = 0; d < kRanks; ++d)
      if (d >= R) pos[d] = -1;
    reduce_token<kRanks, kBias>(a, t, pos, lane);
    if (a.out_weights != nullptr && lane < K) {
      float acc = 0.0f;
#pragma unroll
      for (int d = 0; d < kRanks; ++d) {
        if (pos[d] < 0) continue;
        const float w = d == rank ? __ldg(a.topk_weights + static_cast<size_t>(own_base + pos[d]) * K + lane)
                                  : __int_as_float(ht.meta(rank, d, pos[d])[K + lane]);
        acc = acc + w;
      }
      a.out_weights[static_cast<size_t>(t) * K + lane] = acc;
    }
  }
}

template <int kRanks, bool kBias>
__global__ void __launch_bounds__(kHtThreads, 1) combine_kernel(const __grid_constant__ CombineArgs a) {
  const long long epoch = begin_call(a.ht);
  const int warp = warp_id(), lane = dev::lane_id();
  constexpr int kWarps = kHtThreads / 32;
  if (a.send_blocks > 0) {
    if (static_cast<int>(blockIdx.x) < a.send_blocks)
      run_sender(a, epoch, blockIdx.x * kWarps + warp, a.send_blocks * kWarps, lane);
    else
      run_reducer<kRanks, kBias>(a, epoch, (blockIdx.x - a.send_blocks) * kWarps + warp,
                                 (gridDim.x - a.send_blocks) * kWarps, lane);
  } else if (warp < a.send_warps) {
    run_sender(a, epoch, blockIdx.x * a.send_warps + warp, gridDim.x * a.send_warps, lane);
  } else {
    const int reducers = kWarps - a.send_warps;
    run_reducer<kRanks, kBias>(a, epoch, blockIdx.x * reducers + (warp - a.send_warps), gridDim.x * reducers, lane);
  }
  end_call(a.ht, epoch);
}

// The rank count is a template parameter (register arrays over the ranks of a token).
template <int kRanks>
void launchFor(const CombineArgs& a, cudaStream_t stream) {
  if (a.bias0 != nullptr || a.bias1 != nullptr)
    combine_kernel<kRanks, true><<<a.num_sms, kHtThreads, 0, stream>>>(a);
  else
    combine_kernel<kRanks, false><<<a.num_sms, kHtThreads, 0, stream>>>(a);
}

}  // namespace

cudaError_t launchCombine(const CombineArgs& args, cudaStream_t stream) {
  CombineArgs a = args;
  const int R = a.ht.comm.num_ranks;
  a.send_warps = htCombineSendWarps(R);
  a.send_blocks = htCombineSendBlocks(R, a.num_sms);
  if (R <= 2)
    launchFor<2>(a, stream);
  else if (R <= 4)
    launchFor<4>(a, stream);
  else
    launchFor<8>(a, stream);
  return cudaGetLastError();
}

cudaError_t loadCombineKernels() {
  cudaFuncAttributes attr;
  for (cudaError_t e :
       {cudaFuncGetAttributes(&attr, combine_kernel<2, false>), cudaFuncGetAttributes(&attr, combine_kernel<2, true>),
        cudaFuncGetAttributes(&attr, combine_kernel<4, false>), cudaFuncGetAttributes(&attr, combine_kernel<4, true>),
        cudaFuncGetAttributes(&attr, combine_kernel<8, false>), cudaFuncGetAttributes(&attr, combine_kernel<8, true>)})
    if (e != cudaSuccess) return e;
  return cudaSuccess;
}

}  // namespace ht
}  // namespace nccl_moe
