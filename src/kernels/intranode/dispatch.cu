// High-throughput intranode dispatch (ncclMoeDispatch), fresh or cached: the routing comes from the handle
// the notify filled (src/kernels/intranode/notify.cu), so a re-dispatch of new data costs this kernel only.
//
// Computes, on every rank d, for every source rank s and i < count(s -> d), with row = recv_prefix[s] + i and
// t = send_list_s[d][i] (the i-th token of s holding an expert on d):
//   recv_x[row]              = x_s[t]                 (bf16 or fp8 bytes, bitwise)
//   recv_x_scales[row][w]    = x_scales_s[t][w]       (fp8: float words, or packed ue8m0 int32 words)
//   recv_topk_idx[row][k]    = e - d*E_l if expert e = topk_idx_s[t][k] lives on d, else -1
//   recv_topk_weights[row][k]= topk_weights_s[t][k] where the id is local, else 0.0f
// Worst-case mode: rows [N_recv, recv_capacity) get ids -1 (and weights 0); rows past recv_capacity are never
// written and the last block records kErrCapacity (so the call after returns the error on this rank).
//
// Buffer regions (src/mem/ht_layout.h), on receiving rank d: x[s][i], meta[s][i] (ids, weights, scale words),
// row_flag[s][i]; arrive[] in HtSync.
//
// Roles: grid = num_sms blocks of kHtThreads threads, each warp a SENDER or a LOCAL warp. Default (block
// split, htDispatchSendBlocks): blocks [0, num_sms/2) are all senders, the others all local; or (warp split,
// htDispatchSendWarps) warps [0, send_warps) of every block send and the others are local. Work items are
// interleaved over all warps of a role across the grid:
//   sender warp w (global index over the grid) takes items w, w + W, ...; item i = (pos = i / (R-1), peer
//     d = r + 1 + i % (R-1) mod R): it copies token send_list[d][pos] (row + metadata) with 16-byte stores into
//     d's x[r][pos] / meta[r][pos], then sets d's row_flag[r][pos] = epoch (warp barrier, release, system scope).
//     Before its first store into d's region it waits arrive[d] >= epoch (d left the previous call).
//   local warp w takes (a) own rows pos = w, w + W', ... of send_list[r], copied straight from x to the output
//     rows recv_prefix[r] + pos (no buffer, no NVLink), and (b) copy-out items in the same (pos, source)
//     interleave: rows s -> r are copied from this rank's x[s][pos] / meta[s][pos] to output row
//     recv_prefix[s] + pos once row_flag[s][pos] >= epoch. The warp peeks the flags of its next 32 copy-out
//     items at once (one lane each) and copies the ready prefix; when none is ready it copies an own row
//     instead, so local copies overlap the NVLink traffic and copy-out starts with the first rows.
// Ordering: the sender's row stores -> __syncwarp -> lane 0 st.release.sys(flag); the receiver's lane
//   ld.acquire.sys(flag) -> __syncwarp -> the warp's loads of the row. Every wait is bounded (wait.cuh); a warp
//   whose wait fails stops (it consumes nothing more) and the kernel ends normally with the error recorded.
#include <cuda_runtime.h>

#include "kernels/intranode/args.h"
#include "kernels/intranode/common.cuh"
#include "kernels/intranode/tuning.h"

namespace nccl_moe {
namespace ht {
namespace {

// Local expert id of global expert e on rank d, or -1.
__device__ __forceinline__ int local_expert(int e, int d, int El) {
  const int local = e - d * El;
  return (e >= 0 && local >= 0 && local < El) ? local : -1;
}

__device__ __forceinline__ int scale_word(const DispatchArgs& a, int t, int w) {
  return __ldg(a.x_scales + t * a.scale_token_stride + w * a.scale_word_stride);
}

// Sender: metadata of token t for rank d into d's meta record.
__device__ __forceinline__ void send_meta(const DispatchArgs& a, int t, int d, int* meta, int lane) {
  const int K = a.topk;
  if (lane < K) {
    const int local = local_expert(__ldg(a.topk_idx32 + static_cast<size_t>(t) * K + lane), d, a.num_local_experts);
    meta[lane] = local;
    if (a.topk_weights != nullptr)
      meta[K + lane] = local >= 0 ? __float_as_int(__ldg(a.topk_weights + static_cast<size_t>(t) * K + lane)) : 0;
  }
  for (int w = lane; w < a.num_scale_words; w += 32) meta[2 * K + w] = scale_word(a, t, w);
}

__device__ __forceinline__ void write_ids(const DispatchArgs& a, int row, int k, int local, int weight_bits) {
  const size_t i = static_cast<size_t>(row) * a.topk + k;
  if (a.recv_topk_idx != nullptr) {
    if (a.recv_idx_int64)
      static_cast<long long*>(a.recv_topk_idx)[i] = local;
    else
      static_cast<int*>(a.recv_topk_idx)[i] = local;
  }
  if (a.recv_topk_weights != nullptr) a.recv_topk_weights[i] = __int_as_float(weight_bits);
}

__device__ void run_sender(const DispatchArgs& a, long long epoch, int sw, int num_sw, int lane) {
  const HtDevice& ht = a.ht;
  const int R = ht.comm.num_ranks, rank = ht.comm.rank, peers = R - 1;
  if (peers == 0) return;
  int max_count = 0;
  for (int d = 0; d < R; ++d)
    if (d != rank) max_count = max(max_count, __ldg(a.send_count + d));
  const int total = max_count * peers;  // < 2^24 * 7: fits an int
  const int n16 = a.row_bytes / 16;
  unsigned arrived = 0;
  for (int i = sw; i < total; i += num_sw) {
    const int pos = i / peers;
    int d = rank + 1 + (i - pos * peers);
    if (d >= R) d -= R;
    if (pos >= __ldg(a.send_count + d)) continue;
    if (!((arrived >> d) & 1u)) {
      if (!warp_wait_geq(ht.comm, &ht.sync(rank)->arrive[d], epoch, Phase::kHtDispatch, d, lane)) return;
      arrived |= 1u << d;
    }
    const int t = __ldg(a.send_list + static_cast<size_t>(d) * a.capacity + pos);
    warp_copy<true>(reinterpret_cast<int4*>(ht.x(d, rank, pos, a.row_bytes)),
                    reinterpret_cast<const int4*>(a.x + static_cast<size_t>(t) * a.row_bytes), n16, lane);
    send_meta(a, t, d, ht.meta(d, rank, pos), lane);
    __syncwarp();
    if (lane == 0) dev::st_release_sys(ht.row_flag(d, rank, pos), epoch);
  }
}

// Own token: straight from the caller's input to the output row.
__device__ __forceinline__ void copy_own_row(const DispatchArgs& a, int pos, int lane) {
  const int rank = a.ht.comm.rank;
  const int row = __ldg(a.recv_prefix + rank) + pos;
  if (row >= a.out_rows) return;
  const int t = __ldg(a.send_list + static_cast<size_t>(rank) * a.capacity + pos);
  warp_copy<true>(reinterpret_cast<int4*>(a.recv_x + static_cast<size_t>(row) * a.row_bytes),
                  reinterpret_cast<const int4*>(a.x + static_cast<size_t>(t) * a.row_bytes), a.row_bytes / 16, lane);
  const int K = a.topk;
  if (lane < K) {
    const int local = local_expert(__ldg(a.topk_idx32 + static_cast<size_t>(t) * K + lane), rank, a.num_local_experts);
    const int w = (local >= 0 && a.topk_weights != nullptr)
                      ? __float_as_int(__ldg(a.topk_weights + static_cast<size_t>(t) * K + lane))
                      : 0;
    write_ids(a, row, lane, local, w);
  }
  for (int w = lane; w < a.num_scale_words; w += 32)
    a.recv_x_scales[static_cast<size_t>(row) * a.num_scale_words + w] = scale_word(a, t, w);
}

// Row pos from source s, already flagged: from this rank's slot to the output row.
__device__ __forceinline__ void copy_out_row(const DispatchArgs& a, int s, int pos, int lane) {
  const HtDevice& ht = a.ht;
  const int rank = ht.comm.rank;
  const int row = __ldg(a.recv_prefix + s) + pos;
  if (row >= a.out_rows) return;
  warp_copy<false>(reinterpret_cast<int4*>(a.recv_x + static_cast<size_t>(row) * a.row_bytes),
                   reinterpret_cast<const int4*>(ht.x(rank, s, pos, a.row_bytes)), a.row_bytes / 16, lane);
  const int* meta = ht.meta(rank, s, pos);
  const int K = a.topk;
  if (lane < K) write_ids(a, row, lane, meta[lane], a.topk_weights != nullptr ? meta[K + lane] : 0);
  for (int w = lane; w < a.num_scale_words; w += 32)
    a.recv_x_scales[static_cast<size_t>(row) * a.num_scale_words + w] = meta[2 * K + w];
}

__device__ void run_local(const DispatchArgs& a, long long epoch, int lw, int num_lw, int lane) {
  const HtDevice& ht = a.ht;
  const int R = ht.comm.num_ranks, rank = ht.comm.rank, peers = R - 1;
  const int num_own = __ldg(a.send_count + rank);
  int max_from = 0;
  for (int s = 0; s < R; ++s)
    if (s != rank) max_from = max(max_from, __ldg(a.recv_prefix + s + 1) - __ldg(a.recv_prefix + s));
  const int total_out = peers > 0 ? max_from * peers : 0;
  // Copy-out item i -> (source s, pos); `pos < count(s)` tells whether the item holds a row.
  auto decode = [&](int i, int& s, int& pos) {
    pos = i / peers;
    s = rank + 1 + (i - pos * peers);
    if (s >= R) s -= R;
  };
  auto from_count = [&](int s) { return __ldg(a.recv_prefix + s + 1) - __ldg(a.recv_prefix + s); };

  int own = lw;
  int out = lw;
  bool failed = false;
  while (!failed) {
    // How many of the next copy-out items (out, out + W', ...) are empty or flagged: lane j checks item j.
    int ready = 0;
    if (out < total_out) {
      const int item = out + lane * num_lw;
      bool ok = false;
      if (item < total_out) {
        int s, pos;
        decode(item, s, pos);
        ok = pos >= from_count(s) || dev::ld_acquire_sys(ht.row_flag(rank, s, pos)) >= epoch;
      }
      const unsigned mask = __ballot_sync(kFullMask, ok);
      __syncwarp();
      ready = mask == kFullMask ? 32 : __ffs(~mask) - 1;
    }
    if (ready == 0) {
      if (own < num_own) {
        copy_own_row(a, own, lane);
        own += num_lw;
        continue;
      }
      if (out >= total_out) break;
      int s, pos;
      decode(out, s, pos);  // not empty, not yet flagged: block on it
      if (!warp_wait_geq(ht.comm, ht.row_flag(rank, s, pos), epoch, Phase::kHtDispatch, s, lane)) {
        failed = true;
        break;
      }
      ready = 1;
    }
    for (int q = 0; q < ready; ++q, out += num_lw) {
      int s, pos;
      decode(out, s, pos);
      if (pos < from_count(s)) copy_out_row(a, s, pos, lane);
    }
  }
  if (failed) return;
  // after the loop: every own row and every row from the peers is in the caller's output
  if (a.worst_case && lane < a.topk) {
    const int num_recv = __ldg(a.recv_prefix + R);
    for (int row = num_recv + lw; row < a.out_rows; row += num_lw) write_ids(a, row, lane, -1, 0);
  }
}

__global__ void __launch_bounds__(kHtThreads, 1) dispatch_kernel(const __grid_constant__ DispatchArgs a) {
  const long long epoch = begin_call(a.ht);
  const int warp = warp_id(), lane = dev::lane_id();
  constexpr int kWarps = kHtThreads / 32;
  if (a.send_blocks > 0) {
    if (static_cast<int>(blockIdx.x) < a.send_blocks)
      run_sender(a, epoch, blockIdx.x * kWarps + warp, a.send_blocks * kWarps, lane);
    else
      run_local(a, epoch, (blockIdx.x - a.send_blocks) * kWarps + warp, (gridDim.x - a.send_blocks) * kWarps, lane);
  } else if (warp < a.send_warps) {
    run_sender(a, epoch, blockIdx.x * a.send_warps + warp, gridDim.x * a.send_warps, lane);
  } else {
    const int local_warps = kWarps - a.send_warps;
    run_local(a, epoch, blockIdx.x * local_warps + (warp - a.send_warps), gridDim.x * local_warps, lane);
  }
  if (end_call(a.ht, epoch) && a.worst_case) {
    const int num_recv = a.recv_prefix[a.ht.comm.num_ranks];
    if (num_recv > a.out_rows) dev::record_error(a.ht.comm, kErrCapacity, Phase::kHtDispatch, -1, num_recv, a.out_rows);
  }
}

}  // namespace

cudaError_t launchDispatch(const DispatchArgs& args, cudaStream_t stream) {
  DispatchArgs a = args;
  a.send_warps = htDispatchSendWarps(a.ht.comm.num_ranks);
  a.send_blocks = htDispatchSendBlocks(a.ht.comm.num_ranks, a.num_sms);
  dispatch_kernel<<<a.num_sms, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadDispatchKernels() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, dispatch_kernel);
}

}  // namespace ht
}  // namespace nccl_moe
