// Low-latency combine (decode): ncclMoeLowLatencyCombine (the zero-copy buffer is in src/ops/ll.cc).
//
// Computes, on every rank s and for every token t < T_s, bit for bit as ref::ll_combine:
//   P_d(t) = bf16_rne(acc), acc = 0.0f, then for each valid slot k of t on rank d, k ascending:
//            acc = fmaf(w[t,k], float(y_d(t,k)), acc)                  (explicit __fmaf_rn, on rank d)
//   out[t] = bf16_rne(sum), sum = 0.0f, then for each rank d holding a valid slot of t, d ascending:
//            sum = sum + float(P_d(t))                                 (explicit __fadd_rn, on rank s)
// where y_d(t,k) is row recv_row[s][t][k] of slab (local expert of slot k) of rank d's input (args.x, or the
// library-owned combine buffer with zero_copy). Tokens with no valid slot give +0. Sending the bf16 partials
// halves the NVLink bytes (2H per (token, rank) instead of 4H).
//
// Weights: args.topk_weights when given (pushed by owner s into every rank d: d.weights[s], then
// d.combine_weight_flag[s]); when NULL, the ones the dispatch carried in its message headers (no exchange).
//
// Regions (src/mem/ll_layout.h, the half recorded in the handle by its dispatch):
//   expert rank d writes P_d(t) into s.comb_recv[d][t], then s.combine_flag[d] (one flag per (d, s));
//   owner s, after reading them, acks d.combine_ack[s] = tag (d may overwrite them in this half's next combine).
//
// Roles (grid = kBlocksPerSm blocks on every SM, kThreads per block):
//   send:  [block 0's warp d pushes the weights to rank d.] Warp 0 of every block waits for every rank's ack of
//          tag - 1 [and weight flag]; meanwhile warp 1 computes the received-token ranges and (header weights)
//          resolves the block's first token. Blocks take received tokens (s, t) (flattened over sources,
//          g = b, b + grid, ...): a warp resolves the token's slots (dispatch header still in this half: tag +
//          local expert + weight per slot; recv_row from the handle), then all threads reduce 8 channels each
//          over those rows (loads batched 6 rows deep) and store the bf16 partial (16-byte stores) into s's
//          buffer. The last block to finish publishes s.combine_flag[d] for every s.
//   recv:  warp 1 resolves the first token's rank mask while warp 0 waits for every rank's flag; block b sums
//          the partials of its tokens t = b, b + grid, ... in rank order and writes out[t]. The last block
//          bumps the half's combine epoch and acks every rank.
//
// Signalling: tag = control.combine_epoch + 1 of the half (device memory, graph-replay safe). Every wait is
// bounded (wait.cuh, phase ll-combine-recv); a failed wait leaves the kernel.
// The send half needs topk_weights or a dispatch that carried them; the receive half needs topk_idx.
#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/low_latency/args.h"
#include "kernels/low_latency/common.cuh"
#include "kernels/low_latency/masks.cuh"

namespace nccl_moe {
namespace {

constexpr int kRowBatch = 6;     // rows loaded before accumulating (6: no spills at 64 registers)
constexpr int kChunkUnroll = 1;  // 8-channel chunks per thread in flight (64 registers: 2 blocks per SM)
constexpr int kRankGroup = 4;    // receive: partial rows loaded before accumulating

__device__ __forceinline__ void reduce_token_rows(const LlCombineArgs& p, const long long* rows, const float* w, int n,
                                                  uint8_t* dst) {
  const int H = p.hidden;
  const int n8 = H / 8;
  for (int c0 = threadIdx.x; c0 < n8; c0 += kChunkUnroll * ll::kThreads) {
    float acc[kChunkUnroll][8];
#pragma unroll
    for (int u = 0; u < kChunkUnroll; ++u)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[u][e] = 0.0f;
    for (int i0 = 0; i0 < n; i0 += kRowBatch) {
      int4 v[kRowBatch][kChunkUnroll];
#pragma unroll
      for (int b = 0; b < kRowBatch; ++b)
#pragma unroll
        for (int u = 0; u < kChunkUnroll; ++u) {
          const int c = c0 + u * ll::kThreads;
          if (i0 + b < n && c < n8) v[b][u] = dev::ld_nc_v4(reinterpret_cast<const int4*>(p.y + rows[i0 + b] * H) + c);
        }
#pragma unroll
      for (int b = 0; b < kRowBatch; ++b) {
        if (i0 + b >= n) break;
        const float wb = w[i0 + b];
#pragma unroll
        for (int u = 0; u < kChunkUnroll; ++u) {
          float f[8];
          dev::bf16x8_to_float(v[b][u], f);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[u][e] = __fmaf_rn(wb, f[e], acc[u][e]);  // the contract's FMA
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kChunkUnroll; ++u) {
      const int c = c0 + u * ll::kThreads;
      if (c < n8) dev::st_na_v4(reinterpret_cast<int4*>(dst) + c, dev::float8_to_bf16x8(acc[u]));
    }
  }
}

// kMasks: the rank-mask variant (masks.cuh), launched when p.comm.rank_mask is set. Masked ranks get no weights and
// no partials, their tokens (as a dispatch source) are not reduced, and their partials (as an expert rank) are left
// out of every token's sum.
template <bool kMasks>
__global__ void __launch_bounds__(ll::kThreads, ll::kBlocksPerSm)
    ll_combine_kernel(const __grid_constant__ LlCombineArgs p) {
  __shared__ int s_first[kMaxNvlPeers + 1];
  __shared__ int s_src, s_tok;
  __shared__ long long s_rows[kMaxTopk];
  __shared__ float s_w[kMaxTopk];
  __shared__ int s_n;
  __shared__ int s_mask;
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int me = p.comm.rank, R = p.comm.num_ranks, K = p.topk, H = p.hidden;
  uint8_t* my_half = ll::half_of(p.comm, me, p.half_offset);
  LlControl* ctrl = ll::control(L, my_half);
  // Thread 0 loads the epochs for the block (all warps of all blocks loading the same words queue at one L2 slice).
  __shared__ long long s_epochs[2];
  __shared__ uint32_t s_live;  // kMasks: the active ranks as this block last read them
  if (tid == 0) {
    s_epochs[0] = *reinterpret_cast<volatile long long*>(&ctrl->combine_epoch);
    s_epochs[1] = *reinterpret_cast<volatile long long*>(&ctrl->dispatch_epoch);
    if constexpr (kMasks) s_live = ll::live_ranks(p.comm);
  }
  __syncthreads();
  const long long tag = s_epochs[0] + 1;

  if (p.do_send) {
    const int dispatch_tag = static_cast<int>(s_epochs[1] / kLlArrivalUnits);
    const bool push = p.topk_weights != nullptr;
    // Weights given to the combine go to every rank (they reduce this rank's tokens per rank before sending
    // them back); without them the dispatch headers' weights are used and nothing is exchanged here.
    if (push && blockIdx.x == 0 && warp < R && (!kMasks || ll::is_live(s_live, warp))) {
      uint8_t* peer_half = ll::half_of(p.comm, warp, p.half_offset);
      float* dst = ll::combine_weights(L, peer_half, me);
      const int n = p.num_tokens * K;
      for (int i = lane; i < n; i += 32) dst[i] = p.topk_weights[i];
      __syncwarp();
      if (lane == 0) {
        dev::fence_acq_rel_sys();
        dev::st_release_sys(&ll::control(L, peer_half)->combine_weight_flag[me], tag);
      }
    }
    // Slots of received token g (flattened over sources): rows, weights and count into shared memory. Every
    // slot's words are loaded at once (all in bounds), then filtered: one round trip. Warp-level.
    auto resolve = [&](int g) {
      int s = 0;
      while (s + 1 < R && s_first[s + 1] <= g) ++s;
      const int t = g - s_first[s];
      const uint8_t* msg = ll::dispatch_msg(L, my_half, s, t);
      int msg_tag = 0, lid = -1, row = 0;
      float w = 0.0f;
      if (lane < K) {
        const uint64_t word = reinterpret_cast<const volatile LlMsgHeader*>(msg)->slot_word[lane / 2];
        msg_tag = static_cast<int>(ll_slot_tag(word));
        lid = ll_slot_expert(word, lane & 1);
        row = p.recv_row[(static_cast<size_t>(s) * L.tokens + t) * L.topk + lane];
        w = push ? ll::combine_weights(L, my_half, s)[t * K + lane]
                 : reinterpret_cast<const float*>(msg + offsetof(LlMsgHeader, weight))[lane];
      }
      const bool slot_valid = lane < K && msg_tag == dispatch_tag && lid >= 0;
      const unsigned valid = __ballot_sync(0xffffffffu, slot_valid);
      if (slot_valid) {
        const int pos = __popc(valid & ((1u << lane) - 1u));
        s_rows[pos] = static_cast<long long>(lid) * L.slab_rows() + row;
        s_w[pos] = w;
      }
      if (lane == 0) {
        s_n = __popc(valid);
        s_src = s;
        s_tok = t;
      }
    };
    // Warp 1: the received token counts (local: the dispatch's flags) and, when the weights come with the
    // dispatch, this block's first token, while warp 0 waits for the acks (and pushed weights).
    if (warp == 1) {
      int tokens = 0;
      if (lane < R) {
        const long long flag = ctrl->dispatch_flag[lane];
        tokens = static_cast<int>(flag & 0xffffffffll);
        tokens = tokens < L.tokens ? tokens : L.tokens;
        // A masked source gets nothing back; one masked during the dispatch may have left an older flag.
        if constexpr (kMasks)
          if (!ll::is_live(s_live, lane) || (flag >> 32) != static_cast<long long>(dispatch_tag)) tokens = 0;
      }
      const int inc = ll::warp_inclusive_scan(tokens);
      if (lane < R) s_first[lane] = inc - tokens;
      if (lane == R - 1) s_first[R] = inc;
      __syncwarp();
      if (!push && static_cast<int>(blockIdx.x) < s_first[R]) resolve(blockIdx.x);
    }
    bool ok = true;
    if constexpr (kMasks) {
      if (tid < R && ll::is_live(s_live, tid)) {
        int w = dev::wait_geq_or_mask(p.comm, &ctrl->combine_ack[tid], tag - 1, Phase::kLlCombineRecv, tid);
        if (w == dev::kWaitArrived && push)
          w = dev::wait_geq_or_mask(p.comm, &ctrl->combine_weight_flag[tid], tag, Phase::kLlCombineRecv, tid);
        ok = w != dev::kWaitFailed;
      }
      if (__syncthreads_or(!ok)) return;
      if (tid == 0) s_live = ll::live_ranks(p.comm);  // (the loop below skips tokens of sources masked meanwhile)
      __syncthreads();
    } else {
      if (tid < R) {
        // Rank tid finished reading its partials of this half's previous combine (normally long done).
        ok = dev::wait_geq(p.comm, &ctrl->combine_ack[tid], tag - 1, Phase::kLlCombineRecv, tid);
        if (ok && push) ok = dev::wait_geq(p.comm, &ctrl->combine_weight_flag[tid], tag, Phase::kLlCombineRecv, tid);
      }
      if (__syncthreads_or(!ok)) return;
    }
    const int total = s_first[R];
    for (int g = blockIdx.x; g < total; g += gridDim.x) {
      if (push || g != static_cast<int>(blockIdx.x)) {
        if (warp == 0) resolve(g);
        __syncthreads();
      }
      if (s_n > 0 && (!kMasks || ll::is_live(s_live, s_src))) {
        uint8_t* dst = ll::combine_recv_row(L, ll::half_of(p.comm, s_src, p.half_offset), me, s_tok);
        reduce_token_rows(p, s_rows, s_w, s_n, dst);
      }
      __syncthreads();  // s_rows / s_w / s_n are rewritten by the next token
    }
    if (ll::arrive_last_block(&ctrl->combine_send_arrived, true) && tid < R &&
        (!kMasks || tid == me || !dev::rank_masked(p.comm, tid))) {
      LlControl* peer_ctrl = ll::control(L, ll::half_of(p.comm, tid, p.half_offset));
      dev::st_release_sys(&peer_ctrl->combine_flag[me], tag);
    }
  }

  if (p.do_recv) {
    // Which ranks hold a part of token t (bit d): from topk_idx, local input.
    auto token_mask = [&](int t) {
      int r = -1;
      if (lane < K) {
        const int e = dev::load_topk_id_checked(p.comm, Phase::kLlCombineRecv, p.topk_idx, p.idx_int32,
                                                static_cast<size_t>(t) * K + lane, K, R * L.num_local_experts);
        if (e >= 0) r = e / L.num_local_experts;
      }
      int mask = 0;
      for (int d = 0; d < R; ++d)
        if (__ballot_sync(0xffffffffu, r == d)) mask |= 1 << d;
      return mask;
    };
    // The first token's mask is resolved while the flags are awaited (it needs no peer data).
    if (warp == 1 && blockIdx.x < p.num_tokens) {
      const int mask = token_mask(blockIdx.x);
      if (lane == 0) s_mask = mask;
    }
    bool ok = true;
    if constexpr (kMasks) {
      if (tid < R && ll::is_live(s_live, tid))
        ok = dev::wait_geq_or_mask(p.comm, &ctrl->combine_flag[tid], tag, Phase::kLlCombineRecv, tid) !=
             dev::kWaitFailed;
      if (__syncthreads_or(!ok)) return;
      // The expert ranks this block sums: those still active after its waits (a rank masked by another block
      // afterwards still counts here; that happens only in the call during which the rank is lost).
      if (tid == 0) s_live = ll::live_ranks(p.comm);
      __syncthreads();
    } else {
      if (tid < R) ok = dev::wait_geq(p.comm, &ctrl->combine_flag[tid], tag, Phase::kLlCombineRecv, tid);
      if (__syncthreads_or(!ok)) return;
    }
    const int n8 = H / 8;
    for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
      if (t != static_cast<int>(blockIdx.x)) {
        if (warp == 0) {
          const int mask = token_mask(t);
          if (lane == 0) s_mask = mask;
        }
        __syncthreads();
      }
      const int mask = kMasks ? s_mask & static_cast<int>(s_live) : s_mask;
      int4* out_row = reinterpret_cast<int4*>(p.out + static_cast<size_t>(t) * H);
      for (int c = tid; c < n8; c += ll::kThreads) {
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
        // Ranks in groups of kRankGroup (loads of a group in flight together), d ascending throughout.
        for (int d0 = 0; d0 < R; d0 += kRankGroup) {
          int4 v[kRankGroup];
#pragma unroll
          for (int i = 0; i < kRankGroup; ++i) {
            const int d = d0 + i;
            if (d < R && ((mask >> d) & 1))
              v[i] = dev::ld_v4(reinterpret_cast<const int4*>(ll::combine_recv_row(L, my_half, d, t)) + c);
          }
#pragma unroll
          for (int i = 0; i < kRankGroup; ++i) {
            const int d = d0 + i;
            if (d < R && ((mask >> d) & 1)) {
              float f[8];
              dev::bf16x8_to_float(v[i], f);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[e] = __fadd_rn(acc[e], f[e]);  // plain FP32 adds, d ascending
            }
          }
        }
        dev::st_na_v4(out_row + c, dev::float8_to_bf16x8(acc));
      }
      __syncthreads();  // s_mask is rewritten by the next token
    }
    // gpu scope: only local writes here; the acks' system-scope release publishes every block's reads.
    if (ll::arrive_last_block(&ctrl->combine_recv_arrived, false)) {
      if (tid == 0) ctrl->combine_epoch = tag;
      // Every rank may now overwrite its partials of this half in this rank's buffer.
      if (tid < R && (!kMasks || tid == me || !dev::rank_masked(p.comm, tid)))
        dev::st_release_sys(&ll::control(L, ll::half_of(p.comm, tid, p.half_offset))->combine_ack[me], tag);
    }
  }
}

template <bool kMasks>
cudaError_t loadVariant() {
  (void)ll::grid_blocks<ll_combine_kernel<kMasks>>(1, 0);
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, ll_combine_kernel<kMasks>);
}

}  // namespace

cudaError_t launchLlCombine(const LlCombineArgs& a, cudaStream_t stream) {
  if (a.comm.rank_mask != nullptr)
    ll_combine_kernel<true><<<dim3(ll::grid_blocks<ll_combine_kernel<true>>(a.num_sms, a.max_blocks_per_sm)),
                              dim3(ll::kThreads), 0, stream>>>(a);
  else
    ll_combine_kernel<false><<<dim3(ll::grid_blocks<ll_combine_kernel<false>>(a.num_sms, a.max_blocks_per_sm)),
                               dim3(ll::kThreads), 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t loadLlCombineKernels() {
  const cudaError_t e = loadVariant<false>();
  return e != cudaSuccess ? e : loadVariant<true>();
}

}  // namespace nccl_moe
