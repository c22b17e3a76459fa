// Educational high-throughput intranode dispatch and combine: the executable spec of dispatch.cu and
// combine.cu. Start reading here. Same contract, same buffer protocol, same handle arrays, bitwise the same
// results; what is left out is only speed (no role split between warps, no look-ahead over flags, no
// unrolled loads, no relaxed pre-polling). Selected with NCCL_MOE_HT_KERNEL=educational (src/ops/ht.cc);
// because the protocol is the same, any call may use either version, on any rank, next to the other.
//
// Notation: R ranks, this rank r, E_l = num_experts / R local experts per rank, K = topk, H = hidden.
// The handle (src/core/routing.h) holds what notify.cu computed for this rank's tokens t < T:
//   send_count[d]       tokens of r sent to rank d (a token goes to d once if any of its experts is on d)
//   send_list[d][i]     the i-th of them (ascending token index)
//   send_pos[t][d]      index of t in send_list[d], or -1
//   recv_prefix[s]      rows from source s land in output rows [recv_prefix[s], recv_prefix[s+1]);
//                       N_recv = recv_prefix[R]
//   topk_idx[t][k]      int32 copy of the caller's ids (-1 where masked)
//
// DISPATCH computes, on every rank d, for every source s and i < count(s -> d), with row = recv_prefix[s] + i
// and t = send_list_s[d][i]:
//   recv_x[row]               = x_s[t]                         (bf16 2H bytes or fp8 H bytes, bitwise)
//   recv_x_scales[row][w]     = x_scales_s[t * token_stride + w * word_stride]   (fp8 only; float or packed
//                                                               ue8m0 words, copied as 32-bit words)
//   recv_topk_idx[row][k]     = e - d*E_l if e = topk_idx_s[t][k] is an expert of d, else -1
//   recv_topk_weights[row][k] = topk_weights_s[t][k] where that id is local to d, else 0.0f
// Worst-case mode (recv_capacity > 0): rows [N_recv, recv_capacity) get ids -1 and weights 0.0f; rows past
// recv_capacity are never written and the last block records kErrCapacity.
//
// COMBINE computes, on every home rank s, for every token t < T_s and channel c, in FP32 and this order:
//   acc = 0.0f;  for d = 0 .. R-1 with p = send_pos[t][d] >= 0:  acc = acc + float(x_d[recv_prefix_d[s] + p][c])
//   if bias_0: acc = acc + float(bias_0[t][c]);  if bias_1: acc = acc + float(bias_1[t][c])
//   combined_x[t][c] = bf16_rn(acc)
//   combined_topk_weights[t][k] = 0.0f + w_d[row][k] + ... (same d order), when weights are passed.
// This is ref::ht_dispatch / ref::ht_combine (src/reference/reference.h), so tests compare bitwise.
//
// Buffer regions (src/mem/ht_layout.h, through HtDevice in common.cuh), in the region of RECEIVING rank d:
//   HtSync.arrive[s]  epoch of the call rank s has entered (s writes it into every rank's region)
//   x[s][i]           row i from s (dispatch: s's token; combine: the row d dispatched to s, returned)
//   meta[s][i]        int32 words [K ids][K weights][scale words] (combine uses only the weights)
//   row_flag[s][i]    epoch of the call that completed row i from s
//
// Signalling (identical to the fast kernels; common.cuh explains the epochs):
//   - epoch e = this rank's last epoch + 1 (begin_call); block 0 stores arrive[r] = e into every rank.
//   - a warp about to store into rank d's slots first waits arrive[d] >= e: d has entered this call, so its
//     previous call (which read those slots) is over.
//   - a row is published by: the warp's 16-byte stores of row and metadata -> __syncwarp -> lane 0
//     st.release.sys(row_flag = e). A row is consumed by: lane 0 ld.acquire.sys(row_flag) >= e (bounded wait,
//     src/device/wait.cuh) -> __syncwarp -> the warp's loads. Nothing is ever reset.
//   - the last block to finish stores the epoch (end_call); in worst-case dispatch it also checks capacity.
//   A failed wait (timeout, or a peer's failure recorded) makes that warp skip the rest of the kernel; the
//   error record names phase, rank, peer and counter, and the call (or the next) returns the error.
//
// Roles: none. Every warp of the grid runs the same phases, taking items round-robin by its global index
// w = block * 32 + warp (of W = num_sms * 32 warps):
//   dispatch  phase 1 SEND:    for every destination d, tokens send_list[d][w], [w + W], ...: own rank's rows
//                              go straight to the caller's output, the others into d's slot + flag.
//             phase 2 RECEIVE: for every source s != r, rows s -> r with i = w, w + W, ...: wait the flag,
//                              copy row and metadata from this rank's slot to output row recv_prefix[s] + i.
//             phase 3 (worst case): ids -1 / weights 0 into rows [N_recv, recv_capacity).
//   combine   phase 1 RETURN:  for every home s != r, rows i = w, w + W, ... of s's range of the combine
//                              input go back into s's slot x[r][i] (+ weights), flag.
//             phase 2 REDUCE:  tokens t = w, w + W, ...: wait the flags of every remote row of t, sum the rows
//                              (own row read straight from the combine input) in rank order, add biases.
//
// Launch constraint (why this cannot deadlock): grid = num_sms blocks of kHtThreads threads, one block per SM
// (__launch_bounds__(kHtThreads, 1)), num_sms capped at the GPU's SM count (resolveSms), so every block of
// the grid is resident at once. Phase 2 waits only for rows that phase 1 of the other ranks stores, and
// phase 1 waits only for arrive[], which block 0 of every rank stores first thing. Every block therefore
// finishes its sends without depending on anyone's receives, and all of them run concurrently; the
// receivers' rows always arrive. A grid larger than what fits on the GPU at once (or other kernels holding
// all SMs for longer than NCCL_MOE_TIMEOUT_S) would break that, exactly as for the fast kernels.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/intranode/args.h"
#include "kernels/intranode/common.cuh"

namespace nccl_moe {
namespace ht {
namespace {

constexpr int kWarpsPerBlock = kHtThreads / 32;

// ------------------------------------------------------------------------------------------------
// Shared by both kernels
// ------------------------------------------------------------------------------------------------

// This warp's index among all warps of the grid; work items are dealt round-robin over them.
__device__ __forceinline__ int grid_warp_index() { return static_cast<int>(blockIdx.x) * kWarpsPerBlock + warp_id(); }
__device__ __forceinline__ int grid_warp_count() { return static_cast<int>(gridDim.x) * kWarpsPerBlock; }

// Copies one row of num_16b 16-byte words with the whole warp: lane l moves words l, l + 32, ...
// The source is either the caller's input or a slot whose flag this warp has acquired, so plain (coherent)
// loads are correct for both.
__device__ __forceinline__ void warp_copy_row(int4* dst, const int4* src, int num_16b, int lane) {
  for (int i = lane; i < num_16b; i += 32) dev::st_na_v4(dst + i, dev::ld_v4(src + i));
}

// Lane 0 waits, bounded and with acquire ordering (src/device/wait.cuh), for *flag >= target; the warp barrier
// then orders every lane's later loads after that acquire. Every lane gets the result (false: timeout, or
// another wait of this rank failed; the error record says which).
__device__ __forceinline__ bool warp_wait_flag(const DeviceComm& comm, const long long* flag, long long target,
                                               Phase phase, int peer, int lane) {
  int ok = 1;
  if (lane == 0) ok = dev::wait_geq(comm, flag, target, phase, peer) ? 1 : 0;
  ok = __shfl_sync(kFullMask, ok, 0);
  __syncwarp();
  return ok != 0;
}

// Publishes a row: every lane's stores above happen before lane 0's release store of the flag.
__device__ __forceinline__ void warp_publish(long long* flag, long long epoch, int lane) {
  __syncwarp();
  if (lane == 0) dev::st_release_sys(flag, epoch);
}

// ------------------------------------------------------------------------------------------------
// Dispatch
// ------------------------------------------------------------------------------------------------

// Local id of global expert e on rank d, or -1 (masked, or an expert of another rank).
__device__ __forceinline__ int local_expert_on(int e, int d, int num_local_experts) {
  const int local = e - d * num_local_experts;
  return (e >= 0 && local >= 0 && local < num_local_experts) ? local : -1;
}

// What token t tells rank d in slot k: its local expert id, and the weight bits (0 unless the id is local).
__device__ __forceinline__ void token_slot_for(const DispatchArgs& a, int t, int k, int d, int* id, int* weight_bits) {
  *id = local_expert_on(a.topk_idx32[static_cast<size_t>(t) * a.topk + k], d, a.num_local_experts);
  *weight_bits = 0;
  if (*id >= 0 && a.topk_weights != nullptr)
    *weight_bits = __float_as_int(a.topk_weights[static_cast<size_t>(t) * a.topk + k]);
}

__device__ __forceinline__ int caller_scale_word(const DispatchArgs& a, int t, int w) {
  return a.x_scales[t * a.scale_token_stride + w * a.scale_word_stride];
}

__device__ __forceinline__ void write_output_slot(const DispatchArgs& a, int row, int k, int id, int weight_bits) {
  const size_t i = static_cast<size_t>(row) * a.topk + k;
  if (a.recv_topk_idx != nullptr) {
    if (a.recv_idx_int64)
      static_cast<long long*>(a.recv_topk_idx)[i] = id;
    else
      static_cast<int*>(a.recv_topk_idx)[i] = id;
  }
  if (a.recv_topk_weights != nullptr) a.recv_topk_weights[i] = __int_as_float(weight_bits);
}

// Own token t at position pos of send_list[r]: straight from the caller's input to the output row.
__device__ void dispatch_own_row(const DispatchArgs& a, int t, int pos, int lane) {
  const int rank = a.ht.comm.rank;
  const int row = a.recv_prefix[rank] + pos;
  if (row >= a.out_rows) return;  // capacity overflow (worst-case mode): reported by the last block
  warp_copy_row(reinterpret_cast<int4*>(a.recv_x + static_cast<size_t>(row) * a.row_bytes),
                reinterpret_cast<const int4*>(a.x + static_cast<size_t>(t) * a.row_bytes), a.row_bytes / 16, lane);
  if (lane < a.topk) {
    int id, weight_bits;
    token_slot_for(a, t, lane, rank, &id, &weight_bits);
    write_output_slot(a, row, lane, id, weight_bits);
  }
  for (int w = lane; w < a.num_scale_words; w += 32)
    a.recv_x_scales[static_cast<size_t>(row) * a.num_scale_words + w] = caller_scale_word(a, t, w);
}

// Token t at position pos of send_list[d], d != r: row and metadata into d's slot for r, then the flag.
__device__ void dispatch_peer_row(const DispatchArgs& a, long long epoch, int t, int d, int pos, int lane) {
  const HtDevice& ht = a.ht;
  const int rank = ht.comm.rank, K = a.topk;
  warp_copy_row(reinterpret_cast<int4*>(ht.x(d, rank, pos, a.row_bytes)),
                reinterpret_cast<const int4*>(a.x + static_cast<size_t>(t) * a.row_bytes), a.row_bytes / 16, lane);
  int* meta = ht.meta(d, rank, pos);
  if (lane < K) {
    int id, weight_bits;
    token_slot_for(a, t, lane, d, &id, &weight_bits);
    meta[lane] = id;
    if (a.topk_weights != nullptr) meta[K + lane] = weight_bits;
  }
  for (int w = lane; w < a.num_scale_words; w += 32) meta[2 * K + w] = caller_scale_word(a, t, w);
  warp_publish(ht.row_flag(d, rank, pos), epoch, lane);
}

// Phase 1. Returns false if a wait failed (the warp then stops).
__device__ bool dispatch_send_phase(const DispatchArgs& a, long long epoch, int warp, int num_warps, int lane) {
  const HtDevice& ht = a.ht;
  const int R = ht.comm.num_ranks, rank = ht.comm.rank;
  for (int d = 0; d < R; ++d) {
    const int count = a.send_count[d];
    if (warp >= count) continue;  // no row for this warp: it need not wait for d at all
    // d's slots may still be read by d's previous call until d enters this one.
    if (d != rank && !warp_wait_flag(ht.comm, &ht.sync(rank)->arrive[d], epoch, Phase::kHtDispatch, d, lane))
      return false;
    for (int pos = warp; pos < count; pos += num_warps) {
      const int t = a.send_list[static_cast<size_t>(d) * a.capacity + pos];
      if (d == rank)
        dispatch_own_row(a, t, pos, lane);
      else
        dispatch_peer_row(a, epoch, t, d, pos, lane);
    }
  }
  return true;
}

// Phase 2. Every row sent to this rank is waited for, even one past the capacity that is then dropped, so that
// a call consumes exactly what its peers publish.
__device__ bool dispatch_receive_phase(const DispatchArgs& a, long long epoch, int warp, int num_warps, int lane) {
  const HtDevice& ht = a.ht;
  const int R = ht.comm.num_ranks, rank = ht.comm.rank, K = a.topk;
  for (int s = 0; s < R; ++s) {
    if (s == rank) continue;  // own rows were written in phase 1
    const int base = a.recv_prefix[s], count = a.recv_prefix[s + 1] - base;
    for (int pos = warp; pos < count; pos += num_warps) {
      if (!warp_wait_flag(ht.comm, ht.row_flag(rank, s, pos), epoch, Phase::kHtDispatch, s, lane)) return false;
      const int row = base + pos;
      if (row >= a.out_rows) continue;
      warp_copy_row(reinterpret_cast<int4*>(a.recv_x + static_cast<size_t>(row) * a.row_bytes),
                    reinterpret_cast<const int4*>(ht.x(rank, s, pos, a.row_bytes)), a.row_bytes / 16, lane);
      const int* meta = ht.meta(rank, s, pos);
      if (lane < K) write_output_slot(a, row, lane, meta[lane], a.topk_weights != nullptr ? meta[K + lane] : 0);
      for (int w = lane; w < a.num_scale_words; w += 32)
        a.recv_x_scales[static_cast<size_t>(row) * a.num_scale_words + w] = meta[2 * K + w];
    }
  }
  return true;
}

// Phase 3 (worst-case mode): the rows nobody sent carry ids -1 and weights 0 so consumers can skip them.
__device__ void dispatch_fill_phase(const DispatchArgs& a, int warp, int num_warps, int lane) {
  const int num_recv = a.recv_prefix[a.ht.comm.num_ranks];
  if (lane >= a.topk) return;
  for (int row = num_recv + warp; row < a.out_rows; row += num_warps) write_output_slot(a, row, lane, -1, 0);
}

__global__ void __launch_bounds__(kHtThreads, 1) educational_dispatch_kernel(const __grid_constant__ DispatchArgs a) {
  const long long epoch = begin_call(a.ht);
  const int warp = grid_warp_index(), num_warps = grid_warp_count(), lane = dev::lane_id();
  bool ok = dispatch_send_phase(a, epoch, warp, num_warps, lane);
  // after phase 1: every row this warp owes a peer is stored and flagged, every own row it owns is output.
  if (ok) ok = dispatch_receive_phase(a, epoch, warp, num_warps, lane);
  // after phase 2: every row a peer sent to this warp's positions is in the output (or dropped past capacity).
  if (ok && a.worst_case) dispatch_fill_phase(a, warp, num_warps, lane);
  if (end_call(a.ht, epoch) && a.worst_case) {
    const int num_recv = a.recv_prefix[a.ht.comm.num_ranks];
    if (num_recv > a.out_rows) dev::record_error(a.ht.comm, kErrCapacity, Phase::kHtDispatch, -1, num_recv, a.out_rows);
  }
}

// ------------------------------------------------------------------------------------------------
// Combine
// ------------------------------------------------------------------------------------------------

// Phase 1: rows of this rank's combine input that belong to other home ranks go back to them.
__device__ bool combine_return_phase(const CombineArgs& a, long long epoch, int warp, int num_warps, int lane) {
  const HtDevice& ht = a.ht;
  const int R = ht.comm.num_ranks, rank = ht.comm.rank, K = a.topk;
  for (int s = 0; s < R; ++s) {
    if (s == rank) continue;  // own tokens' rows are read in place by phase 2
    const int base = a.recv_prefix[s], count = a.recv_prefix[s + 1] - base;
    if (warp >= count) continue;
    if (!warp_wait_flag(ht.comm, &ht.sync(rank)->arrive[s], epoch, Phase::kHtCombine, s, lane)) return false;
    for (int pos = warp; pos < count; pos += num_warps) {
      const int row = base + pos;
      // Past the input (only after a capacity error): nothing to send, but the flag keeps s from waiting.
      if (row < a.in_rows) {
        warp_copy_row(reinterpret_cast<int4*>(ht.x(s, rank, pos, a.row_bytes)),
                      reinterpret_cast<const int4*>(a.x + static_cast<size_t>(row) * a.row_bytes), a.row_bytes / 16,
                      lane);
        if (a.topk_weights != nullptr && lane < K)
          ht.meta(s, rank, pos)[K + lane] = __float_as_int(a.topk_weights[static_cast<size_t>(row) * K + lane]);
      }
      warp_publish(ht.row_flag(s, rank, pos), epoch, lane);
    }
  }
  return true;
}

// acc[j] += the j-th of the 8 bf16 values in v (bf16 -> float is exact: the bits shifted into the top half).
__device__ __forceinline__ void accumulate_bf16x8(float (&acc)[8], const int4& v) {
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = acc[2 * i] + __uint_as_float(words[i] << 16);                  // low half: element 2i
    acc[2 * i + 1] = acc[2 * i + 1] + __uint_as_float(words[i] & 0xffff0000u);  // high half: element 2i + 1
  }
}

// Rounds 8 sums to bf16 (round to nearest even), packed like the input.
__device__ __forceinline__ int4 round_to_bf16x8(const float (&acc)[8]) {
  uint32_t words[4];
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    words[i] = *reinterpret_cast<const uint32_t*>(&pair);
  }
  return make_int4(static_cast<int>(words[0]), static_cast<int>(words[1]), static_cast<int>(words[2]),
                   static_cast<int>(words[3]));
}

// Where rank d's contribution to one of this rank's tokens lies (pos = its index in send_list[d]).
__device__ __forceinline__ const int4* contribution_row(const CombineArgs& a, int d, int pos) {
  const HtDevice& ht = a.ht;
  const int rank = ht.comm.rank;
  if (d == rank)
    return reinterpret_cast<const int4*>(a.x + static_cast<size_t>(a.recv_prefix[rank] + pos) * a.row_bytes);
  return reinterpret_cast<const int4*>(ht.x(rank, d, pos, a.row_bytes));
}

__device__ __forceinline__ float contribution_weight(const CombineArgs& a, int d, int pos, int k) {
  const HtDevice& ht = a.ht;
  const int rank = ht.comm.rank;
  if (d == rank) return a.topk_weights[static_cast<size_t>(a.recv_prefix[rank] + pos) * a.topk + k];
  return __int_as_float(ht.meta(rank, d, pos)[a.topk + k]);
}

// Phase 2: one token per warp at a time; all its contributions are present before the sum starts.
__device__ bool combine_reduce_phase(const CombineArgs& a, long long epoch, int warp, int num_warps, int lane) {
  const HtDevice& ht = a.ht;
  const int R = ht.comm.num_ranks, rank = ht.comm.rank, K = a.topk;
  const int num_16b = a.row_bytes / 16;
  for (int t = warp; t < a.num_tokens; t += num_warps) {
    int pos[kMaxNvlPeers];  // pos[d] >= 0: rank d holds a contribution to t
    for (int d = 0; d < R; ++d) {
      pos[d] = a.send_pos[static_cast<size_t>(t) * R + d];
      if (pos[d] < 0) continue;
      if (d == rank) {
        if (a.recv_prefix[rank] + pos[d] >= a.in_rows) pos[d] = -1;  // only after a capacity error
      } else if (!warp_wait_flag(ht.comm, ht.row_flag(rank, d, pos[d]), epoch, Phase::kHtCombine, d, lane)) {
        return false;
      }
    }
    // after this loop: every remote row of t has been acquired by lane 0 and the warp barrier in
    // warp_wait_flag orders the loads below after it.
    const int4* bias0 =
        a.bias0 != nullptr ? reinterpret_cast<const int4*>(a.bias0) + static_cast<size_t>(t) * num_16b : nullptr;
    const int4* bias1 =
        a.bias1 != nullptr ? reinterpret_cast<const int4*>(a.bias1) + static_cast<size_t>(t) * num_16b : nullptr;
    int4* out = reinterpret_cast<int4*>(a.out) + static_cast<size_t>(t) * num_16b;
    for (int c = lane; c < num_16b; c += 32) {
      float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      for (int d = 0; d < R; ++d)  // rank order: the reference's accumulation order
        if (pos[d] >= 0) accumulate_bf16x8(acc, dev::ld_v4(contribution_row(a, d, pos[d]) + c));
      if (bias0 != nullptr) accumulate_bf16x8(acc, dev::ld_v4(bias0 + c));
      if (bias1 != nullptr) accumulate_bf16x8(acc, dev::ld_v4(bias1 + c));
      dev::st_na_v4(out + c, round_to_bf16x8(acc));
    }
    if (a.out_weights != nullptr && lane < K) {
      float acc = 0.0f;
      for (int d = 0; d < R; ++d)
        if (pos[d] >= 0) acc = acc + contribution_weight(a, d, pos[d], lane);
      a.out_weights[static_cast<size_t>(t) * K + lane] = acc;
    }
  }
  return true;
}

__global__ void __launch_bounds__(kHtThreads, 1) educational_combine_kernel(const __grid_constant__ CombineArgs a) {
  const long long epoch = begin_call(a.ht);
  const int warp = grid_warp_index(), num_warps = grid_warp_count(), lane = dev::lane_id();
  // after phase 1: every row this warp owes a home rank is stored there and flagged.
  if (combine_return_phase(a, epoch, warp, num_warps, lane)) combine_reduce_phase(a, epoch, warp, num_warps, lane);
  end_call(a.ht, epoch);
}

}  // namespace

// At most one block per SM and no more blocks than SMs: the whole grid is resident (see the contract).
cudaError_t launchEducationalDispatch(const DispatchArgs& a, cudaStream_t stream) {
  educational_dispatch_kernel<<<a.num_sms, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launchEducationalCombine(const CombineArgs& a, cudaStream_t stream) {
  educational_combine_kernel<<<a.num_sms, kHtThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadEducationalKernels() {
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, educational_dispatch_kernel);
  return e != cudaSuccess ? e : cudaFuncGetAttributes(&attr, educational_combine_kernel);
}

}  // namespace ht
}  // namespace nccl_moe
