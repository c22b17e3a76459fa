// Low-latency combine (decode): ncclMoeLowLatencyCombine and ncclMoeLowLatencyCombineBuffer.
//
// Computes, on every rank s and for every token t < T_s:
//   out[t] = bf16( sum over ranks d ascending that hold one of t's experts of float(P_d(t)) )   (FP32 adds)
//   P_d(t) = bf16( sum over slots k ascending whose expert lives on d of w[t,k] * float(y_d(t,k)) )  (FP32,
//            fused multiply-add allowed)
// where y_d(t,k) is row recv_row[s][t][k] of slab (local expert of slot k) of rank d's input (args.x, or the
// library-owned combine buffer with zero_copy). Tokens with no valid slot give 0. Against the reference
// (one FP32 sum over k, one rounding) this adds one bf16 rounding of each per-rank partial sum:
//   |out - ref| <= 2^-8 * (sum_k |w[t,k] * y(t,k)| + 2 |ref|)   (the partials' roundings, plus both final
//   roundings going opposite ways; FP32 reassociation is far below that).
// Sending the partial sums in bf16 halves the NVLink bytes (2H per (token, rank) instead of 4H).
//
// Regions (src/mem/ll_layout.h, the half recorded in the handle by its dispatch):
//   owner s pushes its [T_s, K] weights into every rank d: d.weights[s], then d.combine_weight_flag[s];
//   expert rank d writes P_d(t) into s.comb_recv[d][t], then s.combine_flag[d] (one flag per (d, s)).
//
// Roles (grid = all SMs, kThreads per block):
//   send:  block 0's warp d pushes the weights to rank d first. Every block then waits for all weights and
//          takes received tokens (s, t) (flattened over sources, g = b, b + grid, ...): warp 0 resolves the
//          token's slots here (header of the dispatch message still in this half: tag + local expert per
//          slot; recv_row from the handle; weight), then all threads reduce 2 x 8 channels each over those
//          rows (loads batched 4 rows deep) and store the bf16 partial (16-byte stores) into s's buffer.
//          The last block to finish publishes s.combine_flag[d] for every s.
//   recv:  waits for every rank's flag; block b sums the partials of its tokens t = b, b + grid, ... in rank
//          order and writes out[t]. The last block bumps the half's combine epoch.
//
// Signalling: tag = control.combine_epoch + 1 of the half (device memory, graph-replay safe). The weight
// push doubles as "s finished reading its previous combine's partials of this half", so no extra ack is
// needed. Every wait is bounded (wait.cuh, phase ll-combine-recv); a failed wait leaves the kernel.
// The send half needs topk_weights (they travel to the expert ranks); the receive half needs topk_idx.
#include <cuda_runtime.h>

#include "core/comm.h"
#include "core/error.h"
#include "core/handle.h"
#include "core/ops.h"
#include "kernels/low_latency/common.cuh"

namespace nccl_moe {
namespace {

struct LlCombineParams {
  DeviceComm comm;
  LlLayout layout;
  size_t half_offset;
  const uint16_t* y;     // [E_l, R*max, H] bf16
  const void* topk_idx;  // [T, K]
  int idx_int32;
  const float* topk_weights;  // [T, K]
  int num_tokens, hidden, topk;
  uint16_t* out;        // [T, H] bf16
  const int* recv_row;  // handle: [R, max, max_topk]
  int do_send, do_recv;
};

constexpr int kRowBatch = 4;     // rows loaded before accumulating
constexpr int kChunkUnroll = 2;  // 8-channel chunks per thread in flight

__device__ __forceinline__ void reduce_token_rows(const LlCombineParams& p, const long long* rows, const float* w,
                                                  int n, uint8_t* dst) {
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
          ll::bf16x8_to_float(v[b][u], f);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[u][e] += wb * f[e];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kChunkUnroll; ++u) {
      const int c = c0 + u * ll::kThreads;
      if (c < n8) dev::st_na_v4(reinterpret_cast<int4*>(dst) + c, ll::float8_to_bf16x8(acc[u]));
    }
  }
}

__global__ void __launch_bounds__(ll::kThreads, 1) llCombineKernel(const __grid_constant__ LlCombineParams p) {
  __shared__ int s_tokens[kLlMaxRanks];
  __shared__ int s_first[kLlMaxRanks + 1];
  __shared__ long long s_rows[kLlMaxTopk];
  __shared__ float s_w[kLlMaxTopk];
  __shared__ int s_n;
  __shared__ int s_mask;
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int me = p.comm.rank, R = p.comm.num_ranks, K = p.topk, H = p.hidden;
  uint8_t* my_half = ll::half_of(p.comm, me, p.half_offset);
  LlControl* ctrl = L.control(my_half);
  const long long tag = ctrl->combine_epoch + 1;

  if (p.do_send) {
    const int dispatch_tag = static_cast<int>(ctrl->dispatch_epoch);
    // Weights to every rank (they reduce this rank's tokens per rank before sending them back).
    if (blockIdx.x == 0 && warp < R) {
      uint8_t* peer_half = ll::half_of(p.comm, warp, p.half_offset);
      float* dst = L.combine_weights(peer_half, me);
      const int n = p.num_tokens * K;
      for (int i = lane; i < n; i += 32) dst[i] = p.topk_weights[i];
      __syncwarp();
      if (lane == 0) {
        dev::fence_acq_rel_sys();
        dev::st_release_sys(&L.control(peer_half)->combine_weight_flag[me], tag);
      }
    }
    bool ok = true;
    if (tid < R) {
      ok = dev::wait_geq(p.comm, &ctrl->combine_weight_flag[tid], tag, Phase::kLlCombineRecv, tid);
      const int tokens = static_cast<int>(ctrl->dispatch_flag[tid] & 0xffffffffll);
      s_tokens[tid] = tokens < L.tokens ? tokens : L.tokens;
    }
    if (__syncthreads_or(!ok)) return;
    if (tid == 0) {
      int first = 0;
      for (int s = 0; s < R; ++s) {
        s_first[s] = first;
        first += s_tokens[s];
      }
      s_first[R] = first;
    }
    __syncthreads();
    const int total = s_first[R];
    const int slab_rows = L.slab_rows();
    for (int g = blockIdx.x; g < total; g += gridDim.x) {
      int s = 0;
      while (s + 1 < R && s_first[s + 1] <= g) ++s;
      const int t = g - s_first[s];
      if (warp == 0) {
        // Every slot's words are loaded at once (all in bounds), then filtered: one round trip.
        const uint8_t* msg = L.dispatch_msg(my_half, s, t);
        int msg_tag = 0, lid = -1, row = 0;
        float w = 0.0f;
        if (lane < K) {
          msg_tag = *reinterpret_cast<const volatile int*>(msg);
          lid = reinterpret_cast<const int16_t*>(msg + offsetof(LlMsgHeader, local_expert))[lane];
          row = p.recv_row[(static_cast<size_t>(s) * L.tokens + t) * L.topk + lane];
          w = L.combine_weights(my_half, s)[t * K + lane];
        }
        const bool slot_valid = lane < K && msg_tag == dispatch_tag && lid >= 0;
        const unsigned valid = __ballot_sync(0xffffffffu, slot_valid);
        if (slot_valid) {
          const int pos = __popc(valid & ((1u << lane) - 1u));
          s_rows[pos] = static_cast<long long>(lid) * slab_rows + row;
          s_w[pos] = w;
        }
        if (lane == 0) s_n = __popc(valid);
      }
      __syncthreads();
      if (s_n > 0) {
        uint8_t* dst = L.combine_recv_row(ll::half_of(p.comm, s, p.half_offset), me, t);
        reduce_token_rows(p, s_rows, s_w, s_n, dst);
      }
      __syncthreads();  // s_rows / s_w / s_n are rewritten by the next token
    }
    if (ll::arrive_last_block(&ctrl->combine_send_arrived) && tid < R) {
      LlControl* peer_ctrl = L.control(ll::half_of(p.comm, tid, p.half_offset));
      dev::st_release_sys(&peer_ctrl->combine_flag[me], tag);
    }
  }

  if (p.do_recv) {
    bool ok = true;
    if (tid < R) ok = dev::wait_geq(p.comm, &ctrl->combine_flag[tid], tag, Phase::kLlCombineRecv, tid);
    if (__syncthreads_or(!ok)) return;
    const int n8 = H / 8;
    for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
      if (warp == 0) {
        int r = -1;
        if (lane < K) {
          const int64_t e = ll::load_expert_id(p.topk_idx, p.idx_int32, static_cast<size_t>(t) * K + lane);
          if (e >= 0) r = static_cast<int>(e / L.num_local_experts);
        }
        int mask = 0;
        for (int d = 0; d < R; ++d)
          if (__ballot_sync(0xffffffffu, r == d)) mask |= 1 << d;
        if (lane == 0) s_mask = mask;
      }
      __syncthreads();
      const int mask = s_mask;
      int4* out_row = reinterpret_cast<int4*>(p.out + static_cast<size_t>(t) * H);
      for (int c = tid; c < n8; c += ll::kThreads) {
        int4 v[kLlMaxRanks];
#pragma unroll
        for (int d = 0; d < kLlMaxRanks; ++d)
          if (d < R && ((mask >> d) & 1))
            v[d] = dev::ld_v4(reinterpret_cast<const int4*>(L.combine_recv_row(my_half, d, t)) + c);
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
#pragma unroll
        for (int d = 0; d < kLlMaxRanks; ++d) {
          if (d < R && ((mask >> d) & 1)) {
            float f[8];
            ll::bf16x8_to_float(v[d], f);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += f[e];
          }
        }
        dev::st_na_v4(out_row + c, ll::float8_to_bf16x8(acc));
      }
      __syncthreads();  // s_mask is rewritten by the next token
    }
    if (ll::arrive_last_block(&ctrl->combine_recv_arrived) && tid == 0) ctrl->combine_epoch = tag;
  }
}

}  // namespace

ncclResult_t opLlCombine(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLCombineArgs_t& args,
                         cudaStream_t stream) {
  LlRouting& r = handle->ll;
  const char* api = "ncclMoeLowLatencyCombine";
  const bool do_send = (args.phase & ncclMoePhaseSend) != 0;
  const bool do_recv = (args.phase & ncclMoePhaseRecv) != 0;
  if (r.recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: the handle's dispatch has not been received yet (call ncclMoeLowLatencyDispatch with "
                        "ncclMoePhaseRecv first)",
                        api);
  }
  if (!do_send && !r.combine_recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: phase is ncclMoePhaseRecv but this handle has no combine send half waiting for its "
                        "receive half",
                        api);
  }
  if (do_send && r.combine_recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: this handle's previous combine send half has not been received yet; call it with "
                        "ncclMoePhaseRecv first",
                        api);
  }
  if (args.num_tokens != r.num_tokens || args.topk != r.topk || args.hidden != r.hidden) {
    return setLastError(ncclInvalidArgument,
                        "%s: num_tokens/topk/hidden are %d/%d/%d, expected the dispatch's %d/%d/%d", api,
                        args.num_tokens, args.topk, args.hidden, r.num_tokens, r.topk, r.hidden);
  }
  if (do_send && args.num_tokens > 0 && args.topk_weights == nullptr) {
    return setLastError(ncclInvalidArgument,
                        "%s: args->topk_weights is NULL; the send half needs the weights (expert ranks reduce "
                        "per rank)",
                        api);
  }

  const LlLayout& L = comm->layout.ll;
  LlCombineParams p{};
  p.comm = comm->deviceComm();
  p.layout = L;
  p.half_offset = comm->layout.ll_offset + static_cast<size_t>(r.half) * comm->layout.ll_half_bytes;
  p.y = static_cast<const uint16_t*>(
      args.zero_copy ? static_cast<const void*>(L.combine_buffer(comm->layout.ll_region(comm->buffer, r.half)))
                     : args.x);
  p.topk_idx = args.topk_idx;
  // The index type is not part of the combine args: the dispatch's is used (recorded in the handle).
  p.idx_int32 = r.idx_int32;
  p.topk_weights = args.topk_weights;
  p.num_tokens = args.num_tokens;
  p.hidden = args.hidden;
  p.topk = args.topk;
  p.out = static_cast<uint16_t*>(args.out);
  p.recv_row = r.recv_row;
  p.do_send = do_send;
  p.do_recv = do_recv;
  llCombineKernel<<<dim3(comm->num_device_sms), dim3(ll::kThreads), 0, stream>>>(p);
  MOE_CUDA_CHECK(cudaGetLastError());
  r.combine_recv_pending = do_send && !do_recv;
  return ncclSuccess;
}

ncclResult_t opLlCombineBuffer(ncclMoeComm* comm, ncclMoeHandle* handle, void** buffer) {
  *buffer = comm->layout.ll.combine_buffer(comm->layout.ll_region(comm->buffer, handle->ll.half));
  return ncclSuccess;
}

}  // namespace nccl_moe
