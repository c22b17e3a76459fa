// The receive roles of the low-latency dispatch (dispatch.cu has the contract): header scan and placement of a
// local expert's rows in (source, token, slot) order, and the warp-per-item copy into the caller's slab (also by
// the helper blocks of a receive team).
#pragma once

#include "kernels/low_latency/dispatch_roles.cuh"
#include "kernels/low_latency/masks.cuh"

namespace nccl_moe {
namespace ll_dispatch {

// Loads the slot words of message (s, t) that cover slots < K: slots 0-7 in one round trip, 8-15 in a second
// (K > 8; fewer live registers). Returns whether every one carries `tag` (this dispatch's header is here);
// *mask = bit k set when slot k names local expert j.
__device__ __forceinline__ bool header_mask(const LlLayout& L, uint8_t* half, int s, int t, uint32_t tag, int j, int K,
                                            uint32_t* mask) {
  const uint64_t* words = reinterpret_cast<const uint64_t*>(ll::dispatch_msg(L, half, s, t));
  bool here = true;
  uint32_t m = 0;
  for (int h = 0; 8 * h < K; ++h) {
    uint64_t w[4];
    dev::ld_relaxed_sys_v2(words + 4 * h, &w[0], &w[1]);
    if (8 * h + 4 < K)
      dev::ld_relaxed_sys_v2(words + 4 * h + 2, &w[2], &w[3]);
    else
      w[2] = w[3] = ll_slot_word(tag, 0xffffffffu);  // slots past K: nothing to wait for
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      here = here && ll_slot_tag(w[i]) == tag;
      if (ll_slot_expert(w[i], 0) == j) m |= 1u << (8 * h + 2 * i);
      if (ll_slot_expert(w[i], 1) == j) m |= 1u << (8 * h + 2 * i + 1);
    }
  }
  *mask = m & ((1u << K) - 1u);
  return here;
}

constexpr unsigned kHeaderPollNs = 200;  // pause between polls of a header that has not arrived

// header_mask until the header of message (s, t) is this dispatch's; bounded like every wait (wait.cuh).
__device__ __forceinline__ bool wait_header(const LlDispatchArgs& p, uint8_t* half, int s, int t, uint32_t tag, int j,
                                            uint32_t* mask) {
  const uint64_t start = dev::globaltimer_ns();
  for (uint32_t spins = 1;; ++spins) {
    __nanosleep(kHeaderPollNs);
    if (header_mask(p.layout, half, s, t, tag, j, p.topk, mask)) return true;
    if ((spins & 63u) == 0) {
      if (dev::error_recorded(p.comm)) return false;
      if (dev::globaltimer_ns() - start > p.comm.timeout_ns) {
        const uint64_t w0 = reinterpret_cast<const volatile uint64_t*>(ll::dispatch_msg(p.layout, half, s, t))[0];
        dev::record_error(p.comm, kErrTimeout, Phase::kLlDispatchRecv, s, static_cast<long long>(ll_slot_tag(w0)),
                          static_cast<long long>(tag));
        return false;
      }
    }
  }
}

// wait_header with rank masks on: dev::kWaitArrived once the header is this dispatch's; dev::kWaitMasked when source
// s is masked meanwhile, or after masking it on a timeout; dev::kWaitFailed when another error was recorded or s is
// this rank (not maskable).
__device__ __noinline__ int wait_header_or_mask(const LlDispatchArgs& p, uint8_t* half, int s, int t, uint32_t tag,
                                                int j, uint32_t* mask) {
  const bool maskable = s != p.comm.rank;
  const uint64_t start = dev::globaltimer_ns();
  for (uint32_t spins = 1;; ++spins) {
    __nanosleep(kHeaderPollNs);
    if (header_mask(p.layout, half, s, t, tag, j, p.topk, mask)) return dev::kWaitArrived;
    if ((spins & 63u) == 0) {
      if (dev::error_recorded(p.comm)) return dev::kWaitFailed;
      if (maskable && dev::rank_masked(p.comm, s)) return dev::kWaitMasked;
      if (dev::globaltimer_ns() - start > p.comm.timeout_ns) {
        if (maskable) {
          dev::mask_rank(p.comm, s);
          return dev::kWaitMasked;
        }
        const uint64_t w0 = reinterpret_cast<const volatile uint64_t*>(ll::dispatch_msg(p.layout, half, s, t))[0];
        dev::record_error(p.comm, kErrTimeout, Phase::kLlDispatchRecv, s, static_cast<long long>(ll_slot_tag(w0)),
                          static_cast<long long>(tag));
        return dev::kWaitFailed;
      }
    }
  }
}

// What recv_expert returns. kRecvRetry (rank masks only): a source was masked while the block waited for its headers
// or rows; the caller drops it (s_tokens[s] = -1) and receives the expert again.
enum RecvResult : int { kRecvFailed = 0, kRecvOk = 1, kRecvRetry = 2 };

constexpr int kMaskCache = 2;     // pass-1 slot masks a lane keeps for pass 2 (segments warp + i * kWarps)
constexpr int kInfoCache = 1024;  // rows whose message index is kept in shared memory for the copy

// Stores scale unit q (float scales of groups 4q..4q+3, as the message holds them) of row i of expert j into
// recv_scales: as floats, or (ue8m0) as one word of their exponent bytes; groups past H / 128 are not stored.
__device__ __forceinline__ void store_scale_unit(const LlDispatchArgs& p, int j, int i, int q, int4 v) {
  const int G = p.hidden / kScaleGroupElems;
  const bool packed = p.scale_format == 2;
  const int scale_words = packed ? (G + 3) / 4 : G;
  uint32_t* srow =
      static_cast<uint32_t*>(p.recv_scales) + (static_cast<size_t>(j) * p.layout.slab_rows() + i) * scale_words;
  const uint32_t f[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
  const int g0 = 4 * q;
  if (packed) {  // absent groups give 0 bytes
    uint32_t e = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b)
      if (g0 + b < G) e |= ((f[b] >> 23) & 0xffu) << (8 * b);
    srow[q] = e;
  } else {
#pragma unroll
    for (int b = 0; b < 4; ++b)
      if (g0 + b < G) srow[g0 + b] = f[b];
  }
}

// Receive: copies rows [0, n) of local expert j from the messages into the caller's slab, work items (row, piece)
// first_item, first_item + stride, ... (one warp each); a row's message slot comes from s_msg (the placing block's
// shared memory, rows < kInfoCache) or from recv_src_info.
template <bool kFp8>
__device__ __forceinline__ void copy_rows(const LlDispatchArgs& p, uint8_t* my_half, int j, int n, int first_item,
                                          int stride, const int* s_msg) {
  const LlLayout& L = p.layout;
  const int lane = threadIdx.x % 32, H = p.hidden;
  const int slab_rows = L.slab_rows();
  const int* src_info = p.recv_src_info + static_cast<size_t>(j) * slab_rows;
  // Warp-per-item copy (pass 3 of the receive). A row is a run of 16-byte units: its payload chunks, then (fp8) its
  // scales, four float scales per unit. Items = (row, piece of 32 * kCopyBatch units) go to the warps in turn, every
  // lane with all its loads in flight before its stores, so an expert with up to kWarps / 2 fp8 rows of H 7168 (462
  // units = 2 pieces) is copied in one round trip per warp, up to kWarps rows in two. (A block-wide flattened
  // chunk loop took ~0.5 us per row: its time grew with the expert's row count, and the expert with the most
  // rows set the kernel's end. Scale words as separate items added a third round for ~15 rows.)
  constexpr int kCopyBatch = kFp8 ? 8 : 7;  // fp8 H 7168: 462 units = 256 + 206; bf16: 896 chunks = 4 x 224
  constexpr int kItemUnits = 32 * kCopyBatch;
  const int G = H / kScaleGroupElems;
  const int pay_units = kFp8 ? H / 16 : H / 8;
  const int row_units = pay_units + (kFp8 ? (G + 3) / 4 : 0);
  const int pieces = (row_units + kItemUnits - 1) / kItemUnits;
  // Unit q of a row is message unit q (payload) or q + scale_shift (q >= pay_units: float scales 4q'..4q'+3 of
  // q' = q - pay_units; in bounds: messages are whole lines). Few values live across the loop: the kernel is
  // capped at 64 registers and the eight loads in flight take 32 of them.
  const int scale_shift = kFp8 ? static_cast<int>((L.msg_scale_offset - kLlHeaderBytes) / 16) - pay_units : 0;
  const uint8_t* msgs = my_half + L.dispatch_offset + kLlHeaderBytes;
  const size_t row_bytes = kFp8 ? static_cast<size_t>(H) : 2 * static_cast<size_t>(H);
  uint8_t* out_base = static_cast<uint8_t*>(p.recv_x) + static_cast<size_t>(j) * slab_rows * row_bytes;
  for (int item = first_item; item < n * pieces; item += stride) {
    const int i = item / pieces, piece = item - i * pieces;
    int slot;
    if (s_msg != nullptr && i < kInfoCache) {
      slot = s_msg[i];
    } else {
      const int info = src_info[i];
      slot = src_info_rank(info) * L.tokens + src_info_token(info);
    }
    const int4* src = reinterpret_cast<const int4*>(msgs + static_cast<size_t>(slot) * L.msg_bytes);
    const int u0 = piece * kItemUnits + lane;
    int4 v[kCopyBatch];
#pragma unroll
    for (int u = 0; u < kCopyBatch; ++u) {
      const int q = u0 + 32 * u;
      if (q < row_units) v[u] = dev::ld_v4(src + q + (kFp8 && q >= pay_units ? scale_shift : 0));
    }
    int4* dst = reinterpret_cast<int4*>(out_base + static_cast<size_t>(i) * row_bytes);
#pragma unroll
    for (int u = 0; u < kCopyBatch; ++u) {
      const int q = u0 + 32 * u;
      if (q >= row_units) continue;
      if (!kFp8 || q < pay_units)
        dev::st_na_v4(dst + q, v[u]);
      else
        store_scale_unit(p, j, i, q - pay_units, v[u]);
    }
  }
}

// s_tokens[s]: the source's token count; with rank masks, -1 for a source the block leaves out (masked).
template <bool kFp8, bool kMasks>
__device__ __forceinline__ int recv_expert(const LlDispatchArgs& p, uint8_t* my_half, int j, int tag, int team,
                                           bool rows_here, const int* s_tokens, const int* s_seg_first, int* s_seg_base,
                                           int num_segments) {
  __shared__ int s_total;
  __shared__ int s_failed;
  __shared__ int s_retry;            // kMasks: a source was masked during the header scan
  __shared__ int s_msg[kInfoCache];  // row i -> message slot s * tokens + t
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int R = p.comm.num_ranks, K = p.topk;
  const int slab_rows = L.slab_rows();
  int* src_info = p.recv_src_info + static_cast<size_t>(j) * slab_rows;

  // Pass 1: rows per 32-token segment, each lane waiting for its message's header (they arrive before the rows;
  // the first kMaskCache masks of a lane stay in registers for pass 2).
  if (tid == 0) {
    s_failed = 0;
    if constexpr (kMasks) s_retry = 0;
  }
  __syncthreads();
  uint32_t cached[kMaskCache];
  {
    int i = 0;
    for (int seg = warp; seg < num_segments; seg += ll::kWarps, ++i) {
      int s = 0;
      while (s + 1 < R && s_seg_first[s + 1] <= seg) ++s;
      const int t = (seg - s_seg_first[s]) * 32 + lane;
      uint32_t m = 0;
      if constexpr (kMasks) {
        if (t < s_tokens[s] && !header_mask(L, my_half, s, t, tag, j, K, &m)) {
          const int w = wait_header_or_mask(p, my_half, s, t, tag, j, &m);
          if (w == dev::kWaitFailed) s_failed = 1;
          if (w == dev::kWaitMasked) s_retry = 1;
        }
      } else {
        if (t < s_tokens[s] && !header_mask(L, my_half, s, t, tag, j, K, &m) &&
            !wait_header(p, my_half, s, t, tag, j, &m))
          s_failed = 1;
      }
#pragma unroll
      for (int c = 0; c < kMaskCache; ++c)
        if (c == i) cached[c] = m;
      const int total = __reduce_add_sync(0xffffffffu, __popc(m));
      if (lane == 0) s_seg_base[seg] = total;
    }
  }
  __syncthreads();
  if (s_failed) return kRecvFailed;
  if constexpr (kMasks) {
    if (s_retry) return kRecvRetry;
  }
  // Exclusive prefix over segments (their order is (s, t) order).
  if (warp == 0) {
    int carry = 0;
    for (int base = 0; base < num_segments; base += 32) {
      const int v = base + lane < num_segments ? s_seg_base[base + lane] : 0;
      const int inc = ll::warp_inclusive_scan(v);
      if (base + lane < num_segments) s_seg_base[base + lane] = carry + inc - v;
      carry += __shfl_sync(0xffffffffu, inc, 31);
    }
    if (lane == 0) s_total = carry;
  }
  __syncthreads();
  const bool first_expert = j == receive_index(p);
  if (first_expert) trace_at(p, kLlTraceRecvScanned);
  // Pass 2: every (s, t, k) gets its row; record provenance for the caller and for combine.
  {
    int i = 0;
    for (int seg = warp; seg < num_segments; seg += ll::kWarps, ++i) {
      int s = 0;
      while (s + 1 < R && s_seg_first[s + 1] <= seg) ++s;
      const int t = (seg - s_seg_first[s]) * 32 + lane;
      uint32_t m = 0;
      if (i < kMaskCache) {
#pragma unroll
        for (int c = 0; c < kMaskCache; ++c)
          if (c == i) m = cached[c];
      } else if (t < s_tokens[s]) {
        header_mask(L, my_half, s, t, tag, j, K, &m);  // here since pass 1
      }
      const int cnt = __popc(m);
      int row = s_seg_base[seg] + ll::warp_inclusive_scan(cnt) - cnt;
      while (m) {
        const int k = __ffs(m) - 1;
        m &= m - 1;
        if (row < slab_rows) {  // only a token naming one expert several times could overflow the slab
          src_info[row] = pack_src_info(s, t);
          if (row < kInfoCache) s_msg[row] = s * L.tokens + t;
          p.recv_row[(static_cast<size_t>(s) * L.tokens + t) * L.topk + k] = row;
        }
        ++row;
      }
    }
  }
  if (first_expert) trace_at(p, kLlTraceRecvPlaced);
  // The rows: complete once every send block of every source has added its share (acquire; the block barrier
  // hands them to the other warps and, through the release of `ready`, to the team).
  if constexpr (kMasks) {
    int w = dev::kWaitArrived;
    if (!rows_here && warp == 0 && lane < R && s_tokens[lane] >= 0)
      w = dev::wait_geq_or_mask(p.comm, &ll::control(L, my_half)->dispatch_count[lane],
                                static_cast<long long>(tag) * kLlArrivalUnits, Phase::kLlDispatchRecv, lane);
    if (__syncthreads_or(w == dev::kWaitFailed)) return kRecvFailed;
    if (__syncthreads_or(w == dev::kWaitMasked)) return kRecvRetry;  // (placement is redone without the source)
  } else {
    bool ok = true;
    if (!rows_here && warp == 0 && lane < R)
      ok = dev::wait_geq(p.comm, &ll::control(L, my_half)->dispatch_count[lane],
                         static_cast<long long>(tag) * kLlArrivalUnits, Phase::kLlDispatchRecv, lane);
    if (__syncthreads_or(!ok)) return kRecvFailed;  // also: s_msg / src_info rows written above are read below
  }
  if (first_expert) trace_at(p, kLlTraceRecvReady);
  const int n = s_total < slab_rows ? s_total : slab_rows;

  if (team > 1 && tid == 0)  // the team's other blocks copy part of the rows (src_info is written above)
    dev::st_release_sys(ll::expert_ready(L, my_half, j), (static_cast<long long>(tag) << 32) | n);
  copy_rows<kFp8>(p, my_half, j, n, warp, team * ll::kWarps, s_msg);
  if (tid == 0) {
    p.recv_count[j] = n;
    if (p.cumulative_stats != nullptr) p.cumulative_stats[j] += n;
  }
  __syncthreads();  // s_seg_base / s_total / s_msg are reused by the next expert
  if (first_expert) trace_at(p, kLlTraceRecvCopied);
  return kRecvOk;
}

}  // namespace ll_dispatch
}  // namespace nccl_moe
