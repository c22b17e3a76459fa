// The send role of the low-latency dispatch (dispatch.cu has the contract): one token's header, payload and
// scales into every destination's message slot, with the FP8 cast in the kernel.
#pragma once

#include "kernels/low_latency/dispatch_roles.cuh"
#include "kernels/low_latency/masks.cuh"

namespace nccl_moe {
namespace ll_dispatch {

constexpr int kSendUnroll = 2;  // bf16: 8-channel chunks per thread in flight

// Sends token t. Its first row loads (this thread's first chunk(s)) are issued before its routing is resolved, so
// the two round trips overlap. (Issuing them before the kernel reads the epoch was tried: the loads then stay live
// across the kernel's prologue and both kernels spill.) With `ack` (the block's first token), warp 1 waits for
// every peer's ack of `ack_tag` (it consumed the previous messages of this half; normally long there) while
// warp 0 resolves the routing; nothing is stored into a peer before. Returns false when that wait failed.
// kMasks (masks.cuh): *s_live is the block's set of active ranks; the ack wait masks a peer that times out (warp 1
// then refreshes *s_live), and nothing goes to a masked rank.
template <bool kFp8, bool kMasks>
__device__ __forceinline__ bool send_token(const LlDispatchArgs& p, int t, int tag, const long long* ack,
                                           long long ack_tag, uint32_t* s_live) {
  __shared__ __align__(16) int16_t s_ids[kMaxNvlPeers][kMaxTopk];  // per destination: slot k's local expert
  __shared__ __align__(16) float s_w[kMaxTopk];
  __shared__ __align__(16) float s_scale[65536 / kScaleGroupElems];  // fp8: the row's scales (H <= 65536)
  __shared__ int s_mask;
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int me = p.comm.rank, R = p.comm.num_ranks, K = p.topk, H = p.hidden;
  const int4* xrow = reinterpret_cast<const int4*>(static_cast<const uint16_t*>(p.x) + static_cast<size_t>(t) * H);
  constexpr int kUnroll = kSendUnroll;
  int4 pre[2];
  if constexpr (kFp8) {
    const int c = warp * 32 + lane;
    if (c < H / 16) {
      pre[0] = dev::ld_nc_v4(xrow + 2 * c);
      pre[1] = dev::ld_nc_v4(xrow + 2 * c + 1);
    }
  } else {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (tid + u * ll::kThreads < H / 8) pre[u] = dev::ld_nc_v4(xrow + tid + u * ll::kThreads);
  }

  if (warp == 0) {
    // 32-bit routing math (a 64-bit division is a call); an id outside [0, R * E_l) is dropped like -1.
    int r = -1, lid = -1;
    float w = 0.0f;
    const int El = L.num_local_experts;
    if (lane < K) {
      const int e = dev::load_topk_id_checked(p.comm, Phase::kLlDispatchSend, p.topk_idx, p.idx_int32,
                                              static_cast<size_t>(t) * K + lane, K, R * El);
      if (p.topk_weights != nullptr) w = p.topk_weights[static_cast<size_t>(t) * K + lane];
      if (e >= 0) {
        r = e / El;
        lid = e - r * El;
      }
    }
    int mask = 0;
    for (int d = 0; d < R; ++d)
      if (__ballot_sync(0xffffffffu, r == d)) mask |= 1 << d;
    if (lane < kMaxTopk) {
      for (int d = 0; d < R; ++d) s_ids[d][lane] = static_cast<int16_t>(r == d ? lid : -1);
      s_w[lane] = w;
    }
    if (lane == 0) s_mask = mask;
  }
  bool ok = true;
  if constexpr (kMasks) {
    if (ack != nullptr && warp == 1) {
      if (lane < R && ll::is_live(*s_live, lane))
        ok = dev::wait_geq_or_mask(p.comm, &ack[lane], ack_tag * kLlArrivalUnits, Phase::kLlDispatchRecv, lane) !=
             dev::kWaitFailed;
      __syncwarp();
      if (lane == 0) *s_live = ll::live_ranks(p.comm);
    }
  } else {
    if (ack != nullptr && warp == 1 && lane < R)
      ok = dev::wait_geq(p.comm, &ack[lane], ack_tag * kLlArrivalUnits, Phase::kLlDispatchRecv, lane);
  }
  if (__syncthreads_or(!ok)) return false;
  uint32_t live = 0xffffffffu;  // kMasks: the block's active ranks
  if constexpr (kMasks) live = *s_live;
  const int mask = kMasks ? s_mask & static_cast<int>(live) : s_mask;
  // Block 0 publishes the token count as soon as the peers have consumed the previous messages of this half:
  // receivers then know which headers to wait for and scan them as they arrive (the data is complete only at
  // the senders' count shares).
  if (ack != nullptr && blockIdx.x == 0 && tid < R && (!kMasks || ll::is_live(live, tid)))
    dev::st_relaxed_sys(&ll::control(L, ll::half_of(p.comm, tid, p.half_offset))->dispatch_flag[me],
                        (static_cast<long long>(tag) << 32) | static_cast<long long>(p.num_tokens));

  // Header, to EVERY rank (receivers wait for the header of each of the source's tokens): eight lanes per
  // destination, in two instructions (two 64-byte writes). Lanes 0-3: the tagged slot words 2i, 2i + 1 (local
  // experts of slots 4i..4i+3) as 64-bit elements; lanes 4-7: the weights of slots 4(i-4)...
  if (tid < 8 * R && (!kMasks || ll::is_live(live, tid / 8))) {
    const int d = tid / 8, i = tid % 8;
    uint8_t* msg = ll::dispatch_msg(L, ll::half_of(p.comm, d, p.half_offset), me, t);
    if (i < 4) {
      const uint2 ids = reinterpret_cast<const uint2*>(s_ids[d])[i];
      dev::st_relaxed_sys_v2(reinterpret_cast<uint64_t*>(msg) + 2 * i, ll_slot_word(tag, ids.x),
                             ll_slot_word(tag, ids.y));
    } else {
      dev::st_na_v4(reinterpret_cast<int4*>(msg) + i, reinterpret_cast<const int4*>(s_w)[i - 4]);
    }
  }

  if constexpr (kFp8) {
    // Chunk c = 16 channels; 8 consecutive lanes hold one 128-channel scale group (c0 is a multiple of 32).
    const int n16 = H / 16;
    for (int c0 = warp * 32; c0 < n16; c0 += ll::kThreads) {
      const int c = c0 + lane;
      const bool active = c < n16;
      float f[16];
      float amax = 0.0f;
      if (active) {
        int4 a, b;
        if (c0 == warp * 32) {
          a = pre[0];
          b = pre[1];
        } else {
          a = dev::ld_nc_v4(xrow + 2 * c);
          b = dev::ld_nc_v4(xrow + 2 * c + 1);
        }
        float fa[8], fb[8];
        dev::bf16x8_to_float(a, fa);
        dev::bf16x8_to_float(b, fb);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          f[i] = fa[i];
          f[8 + i] = fb[i];
        }
#pragma unroll
        for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
      }
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
      if (active) {
        const float scale = dev::fp8_group_scale(amax, p.scale_format);
        const float inv = dev::fp8_inv_scale(scale);
        const int4 q = dev::cast16_to_fp8(f, inv);
        if ((lane & 7) == 0) s_scale[c / 8] = scale;
        for (int d = 0; d < R; ++d) {
          if (!((mask >> d) & 1)) continue;
          uint8_t* msg = ll::dispatch_msg(L, ll::half_of(p.comm, d, p.half_offset), me, t);
          dev::st_na_v4(reinterpret_cast<int4*>(msg + kLlHeaderBytes) + c, q);
        }
      }
    }
    // The scales: staged in shared memory, then warp d stores destination d's in 16-byte vectors (two lines for
    // H 7168; a float store per 8 lanes was one 16-byte partial write per warp and destination). A last vector
    // past the final group is padded with zeros (messages are whole lines).
    const int G = H / kScaleGroupElems, n4 = (G + 3) / 4;
    if (tid < 4 * n4 - G) s_scale[G + tid] = 0.0f;
    __syncthreads();
    if (warp < R && ((mask >> warp) & 1)) {
      int4* dst = reinterpret_cast<int4*>(ll::dispatch_msg(L, ll::half_of(p.comm, warp, p.half_offset), me, t) +
                                          L.msg_scale_offset);
      for (int i = lane; i < n4; i += 32) dev::st_na_v4(dst + i, reinterpret_cast<const int4*>(s_scale)[i]);
    }
  } else {
    const int n8 = H / 8;
    for (int c0 = tid; c0 < n8; c0 += kUnroll * ll::kThreads) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * ll::kThreads;
        if (c < n8) v[u] = c0 == tid ? pre[u] : dev::ld_nc_v4(xrow + c);
      }
      for (int d = 0; d < R; ++d) {
        if (!((mask >> d) & 1)) continue;
        int4* dst =
            reinterpret_cast<int4*>(ll::dispatch_msg(L, ll::half_of(p.comm, d, p.half_offset), me, t) + kLlHeaderBytes);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = c0 + u * ll::kThreads;
          if (c < n8) dev::st_na_v4(dst + c, v[u]);
        }
      }
    }
  }
  __syncthreads();  // s_mask / s_ids / s_w / s_scale are rewritten by the next token
  return true;
}

}  // namespace ll_dispatch
}  // namespace nccl_moe
