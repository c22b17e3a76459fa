// Low-latency dispatch (decode): ncclMoeLowLatencyDispatch.
//
// Computes, on every receiving rank d and for every local expert j of d:
//   recv_x[j][i] = row of token t of rank s, for the i-th (s, t, k) in the order (s ascending, t ascending,
//                  k ascending) among the valid slots whose expert is global expert d * E_l + j;
//   recv_count[j] = number of such slots; cumulative_stats[j] += recv_count[j] (optional);
//   with FP8 the row is cast in the kernel: per 128 channels scale = max(amax, 1e-4) / 448 (rounded up to a
//   power of two for pow2 / ue8m0), q = e4m3_satfinite_rne(x * (1 / scale)) -- bit-identical to ref::.
// and records in the handle recv_src_info[j][i] = (s << 24) | t and recv_row[s][t][k] = i (for combine).
//
// Regions (src/mem/ll_layout.h, one LL half chosen by the host, alternating per dispatch):
//   sender s writes into each destination d: dispatch message slot (s, t) (header + payload + scales) and
//   d.control.dispatch_flag[s]; receiver d writes back s.control.dispatch_ack[d]. With args.topk_weights the
//   header also carries the token's K weights (read by the combine's send half: no weight exchange there).
//
// Deduplication: a token is sent ONCE per destination rank (its header lists the local expert of every slot
// that lives there); the receiver expands it into one row per (expert, slot). Bytes over NVLink per token
// and peer: 128 + H (fp8) + 4*H/128, or 128 + 2H (bf16).
//
// Roles (grid = kBlocksPerSm blocks on every SM, kThreads per block):
//   send:  block b casts/copies tokens t = b, b + grid, ... (all threads on one row, 16 channels a thread for
//          fp8: 8 lanes = one 128-channel scale group; the row is loaded while warp 0 resolves the routing and
//          warp 1 waits for the peers' acks) and stores 16-byte chunks into every destination rank holding one
//          of the token's experts. Each block with tokens (and block 0) then adds its arrival share to
//          d.dispatch_count[s] of every peer d with a release; block 0 first stores d.dispatch_flag[s] =
//          (tag << 32) | T.
//   recv:  block b owns local experts j = b, b + grid, ...: waits for every source's count and flag, scans
//          the headers of all R * T_s slots once (warp per 32-token segment; the slot masks stay in
//          registers), block prefix, which gives every row's position in (s, t, k) order (row -> message index
//          kept in shared memory), then warps copy the rows item by item (a row = its payload units and then its
//          scale units, 16 bytes each, in pieces of 32 x 8 for fp8 / 32 x 7 for bf16; all of a lane's loads in
//          flight) into the caller's slab. Every receiving block adds its share to every source's s.dispatch_ack[d]
//          (relaxed) and to the half's dispatch epoch.
//
// Signalling: tag = control.dispatch_epoch + 1 of this half, read from device memory (so a captured graph
// stays valid across replays; every rank runs the same sequence of LL calls, so every rank's epoch of a half
// agrees). Message headers carry the tag, so slots not written in this dispatch are recognised without
// clearing anything. Before writing into d, a sender waits for d's ack of tag - 1 (d finished reading the
// previous messages of this half). Every wait is bounded (wait.cuh); a failed wait leaves the kernel (its
// block does not arrive, so no later flag is published and peers fail in turn).
//
// Launch constraints: H % 128 == 0 with fp8 (H % 8 == 0 for bf16), T <= tokens of the layout (<= 4096),
// K <= 16, E_l <= 32767. Phase split: the send half (do_send) returns after the last block's flag stores;
// the receive half (do_recv) is a separate launch; phase Both runs both in one kernel.
#include <cuda_runtime.h>

#include "core/comm.h"
#include "core/error.h"
#include "core/handle.h"
#include "core/ops.h"
#include "kernels/low_latency/common.cuh"
#include "kernels/low_latency/trace.h"

namespace nccl_moe {
namespace {

constexpr int kMaxSegments = kLlMaxRanks * (4096 / 32);  // 32-token segments over all sources

struct LlDispatchParams {
  DeviceComm comm;
  LlLayout layout;
  size_t half_offset;    // offset of the LL half inside every rank's buffer
  const void* x;         // [T, H] bf16
  const void* topk_idx;  // [T, K]
  int idx_int32;
  int num_tokens, hidden, topk;
  int use_fp8, scale_format;
  void* recv_x;               // [E_l, R*max, H] bf16 or fp8
  void* recv_scales;          // [E_l, R*max, G] float or [E_l, R*max, P] int32
  int* recv_count;            // [E_l]
  int* cumulative_stats;      // [E_l] or null
  int* recv_src_info;         // [E_l, R*max]
  int* recv_row;              // [R, max, max_topk]
  const float* topk_weights;  // [T, K] or null: copied into the message headers for the combine
  int do_send, do_recv;
  unsigned long long* trace;  // [grid][kLlTracePoints] or null (diagnostics, trace.h)
};

// Stores the time of `point` for this block when tracing (thread 0 only).
__device__ __forceinline__ void trace_at(const LlDispatchParams& p, int point) {
  if (p.trace != nullptr && threadIdx.x == 0)
    p.trace[static_cast<size_t>(blockIdx.x) * kLlTracePoints + point] = dev::globaltimer_ns();
}

// ---------------------------------------------------------------------------------------------------------
// Send
// ---------------------------------------------------------------------------------------------------------

constexpr int kSendUnroll = 2;  // bf16: 8-channel chunks per thread in flight

// The first loads of token t, issued before its routing is resolved (two round trips overlap): this thread's
// first chunk(s) of the row. (Issuing them before the kernel reads the epoch was tried: the loads then stay
// live across the kernel's prologue and both kernels spill.)
struct TokenLoads {
  int4 pre[2];
};

template <bool kFp8>
__device__ __forceinline__ void load_token(const LlDispatchParams& p, int t, TokenLoads& tl) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, H = p.hidden;
  const int4* xrow = reinterpret_cast<const int4*>(static_cast<const uint16_t*>(p.x) + static_cast<size_t>(t) * H);
  if constexpr (kFp8) {
    const int c = warp * 32 + lane;
    if (c < H / 16) {
      tl.pre[0] = dev::ld_nc_v4(xrow + 2 * c);
      tl.pre[1] = dev::ld_nc_v4(xrow + 2 * c + 1);
    }
  } else {
#pragma unroll
    for (int u = 0; u < kSendUnroll; ++u)
      if (tid + u * ll::kThreads < H / 8) tl.pre[u] = dev::ld_nc_v4(xrow + tid + u * ll::kThreads);
  }
}

// Sends token t, whose first row loads are in `tl`, to the ranks of `dest_mask` that hold one of its experts. With
// `ack` (the block's first token), warp 1 waits for
// every peer's ack of `ack_tag` (it consumed the previous messages of this half; normally long there) while
// warp 0 resolves the routing; nothing is stored into a peer before. Returns false when that wait failed.
template <bool kFp8>
__device__ __forceinline__ bool send_token(const LlDispatchParams& p, int t, int tag, int dest_mask,
                                           const long long* ack, long long ack_tag, const TokenLoads& tl) {
  __shared__ int s_rank[kLlMaxTopk];
  __shared__ int s_lid[kLlMaxTopk];
  __shared__ float s_w[kLlMaxTopk];
  __shared__ int s_mask;
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int me = p.comm.rank, R = p.comm.num_ranks, K = p.topk, H = p.hidden;
  const int4* xrow = reinterpret_cast<const int4*>(static_cast<const uint16_t*>(p.x) + static_cast<size_t>(t) * H);
  constexpr int kUnroll = kSendUnroll;
  const int4(&pre)[2] = tl.pre;

  if (warp == 0) {
    // 32-bit routing math (a 64-bit division is a call); an id outside [0, R * E_l) is dropped like -1.
    int r = -1, lid = -1;
    float w = 0.0f;
    const int El = L.num_local_experts;
    if (lane < K) {
      const int64_t e64 = ll::load_expert_id(p.topk_idx, p.idx_int32, static_cast<size_t>(t) * K + lane);
      if (p.topk_weights != nullptr) w = p.topk_weights[static_cast<size_t>(t) * K + lane];
      if (e64 >= 0 && e64 < static_cast<int64_t>(R) * El) {
        const int e = static_cast<int>(e64);
        r = e / El;
        lid = e - r * El;
      }
    }
    int mask = 0;
    for (int d = 0; d < R; ++d)
      if (__ballot_sync(0xffffffffu, r == d)) mask |= 1 << d;
    if (lane < kLlMaxTopk) {
      s_rank[lane] = r;
      s_lid[lane] = lid;
      s_w[lane] = w;
    }
    if (lane == 0) s_mask = mask;
  }
  bool ok = true;
  if (ack != nullptr && warp == 1 && lane < R)
    ok = dev::wait_geq(p.comm, &ack[lane], ack_tag * kLlArrivalUnits, Phase::kLlDispatchRecv, lane);
  if (__syncthreads_or(!ok)) return false;
  const int mask = s_mask & dest_mask;

  // Header, one thread per destination.
  if (tid < R && ((mask >> tid) & 1)) {
    uint8_t* msg = L.dispatch_msg(ll::half_of(p.comm, tid, p.half_offset), me, t);
    uint32_t ids[kLlMaxTopk / 2];
#pragma unroll
    for (int i = 0; i < kLlMaxTopk / 2; ++i) {
      const int a = s_rank[2 * i] == tid ? s_lid[2 * i] : -1;
      const int b = s_rank[2 * i + 1] == tid ? s_lid[2 * i + 1] : -1;
      ids[i] = (static_cast<uint32_t>(a) & 0xffffu) | (static_cast<uint32_t>(b) << 16);
    }
    const int has_w = p.topk_weights != nullptr;
    dev::st_na_v4(reinterpret_cast<int4*>(msg), make_int4(tag, t, has_w, 0));
    dev::st_na_v4(reinterpret_cast<int4*>(msg + 16), make_int4(ids[0], ids[1], ids[2], ids[3]));
    dev::st_na_v4(reinterpret_cast<int4*>(msg + 32), make_int4(ids[4], ids[5], ids[6], ids[7]));
    if (has_w) {
      int4* wdst = reinterpret_cast<int4*>(msg + offsetof(LlMsgHeader, weight));
      for (int i = 0; i < (K + 3) / 4; ++i)
        dev::st_na_v4(wdst + i, make_int4(__float_as_int(s_w[4 * i]), __float_as_int(s_w[4 * i + 1]),
                                          __float_as_int(s_w[4 * i + 2]), __float_as_int(s_w[4 * i + 3])));
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
        ll::bf16x8_to_float(a, fa);
        ll::bf16x8_to_float(b, fb);
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
        const float scale = ll::fp8_group_scale(amax, p.scale_format);
        const float inv = __fdiv_rn(1.0f, scale);
        const int4 q = ll::cast_16_to_fp8(f, inv);
        for (int d = 0; d < R; ++d) {
          if (!((mask >> d) & 1)) continue;
          uint8_t* msg = L.dispatch_msg(ll::half_of(p.comm, d, p.half_offset), me, t);
          dev::st_na_v4(reinterpret_cast<int4*>(msg + kLlHeaderBytes) + c, q);
          if ((lane & 7) == 0) reinterpret_cast<float*>(msg + L.msg_scale_offset)[c / 8] = scale;
        }
      }
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
            reinterpret_cast<int4*>(L.dispatch_msg(ll::half_of(p.comm, d, p.half_offset), me, t) + kLlHeaderBytes);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int c = c0 + u * ll::kThreads;
          if (c < n8) dev::st_na_v4(dst + c, v[u]);
        }
      }
    }
  }
  __syncthreads();  // s_mask / s_rank / s_lid / s_w are rewritten by the next token
  return true;
}

// ---------------------------------------------------------------------------------------------------------
// Receive
// ---------------------------------------------------------------------------------------------------------

// Bit k set when slot k of message (s, t) of this dispatch names local expert j.
__device__ __forceinline__ uint32_t slot_mask(const LlLayout& L, uint8_t* half, int s, int t, int tokens_s, int tag,
                                              int j, int K) {
  if (t >= tokens_s) return 0;
  // All header words are loaded before the tag is checked: one round trip instead of two.
  const uint8_t* msg = L.dispatch_msg(half, s, t);
  const int4 h = dev::ld_v4(reinterpret_cast<const int4*>(msg));
  const int4 a = dev::ld_v4(reinterpret_cast<const int4*>(msg + 16));
  const int4 b = K > 8 ? dev::ld_v4(reinterpret_cast<const int4*>(msg + 32)) : make_int4(-1, -1, -1, -1);
  if (h.x != tag) return 0;
  const uint32_t w[8] = {static_cast<uint32_t>(a.x), static_cast<uint32_t>(a.y), static_cast<uint32_t>(a.z),
                         static_cast<uint32_t>(a.w), static_cast<uint32_t>(b.x), static_cast<uint32_t>(b.y),
                         static_cast<uint32_t>(b.z), static_cast<uint32_t>(b.w)};
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (static_cast<int16_t>(w[i] & 0xffffu) == j) m |= 1u << (2 * i);
    if (static_cast<int16_t>(w[i] >> 16) == j) m |= 1u << (2 * i + 1);
  }
  return m & ((1u << K) - 1u);
}

constexpr int kMaskCache = 4;     // pass-1 slot masks a lane keeps for pass 2 (segments warp + i * kWarps)
constexpr int kInfoCache = 1024;  // rows whose message index is kept in shared memory for the copy
constexpr int kHistChunk = 2048;  // experts counted per pass of count_experts (shared-memory histogram)

// Send part, one block: counts this rank's valid slots per expert (a shared-memory histogram over all T x K ids,
// kHistChunk experts per pass) and stores (tag << 32) | count into expert_count[me][j] of every rank d, for every
// local expert j of d, zeros included. The caller has waited for every rank's ack of the previous dispatch of this
// half (their receive blocks have read the words this overwrites).
__device__ __forceinline__ void count_experts(const LlDispatchParams& p, long long tag) {
  __shared__ int s_hist[kHistChunk];
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, me = p.comm.rank, R = p.comm.num_ranks, El = L.num_local_experts;
  const int E = R * El, n = p.num_tokens * p.topk;
  for (int e0 = 0; e0 < E; e0 += kHistChunk) {
    const int chunk = E - e0 < kHistChunk ? E - e0 : kHistChunk;
    for (int i = tid; i < chunk; i += ll::kThreads) s_hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += ll::kThreads) {
      const int64_t e = ll::load_expert_id(p.topk_idx, p.idx_int32, static_cast<size_t>(i));
      if (e >= e0 && e < e0 + chunk) atomicAdd(&s_hist[static_cast<int>(e) - e0], 1);
    }
    __syncthreads();
    for (int i = tid; i < chunk; i += ll::kThreads) {
      const int e = e0 + i, d = e / El, j = e - d * El;
      long long* word = L.expert_count(ll::half_of(p.comm, d, p.half_offset), me, j);
      *reinterpret_cast<volatile long long*>(word) = (tag << 32) | static_cast<long long>(s_hist[i]);
    }
    __syncthreads();  // s_hist is cleared by the next pass
  }
}

// Receive: waits until the messages of every source in `sources` (bit s = source s) are complete (warp 0, acquire;
// the block barrier extends it to the block). Returns false when a wait failed.
__device__ __forceinline__ bool wait_sources(const LlDispatchParams& p, LlControl* ctrl, unsigned sources,
                                             long long epoch_tag) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  bool ok = true;
  if (warp == 0 && lane < p.comm.num_ranks && ((sources >> lane) & 1))
    ok = dev::wait_geq(p.comm, &ctrl->dispatch_count[lane], epoch_tag * kLlArrivalUnits, Phase::kLlDispatchRecv, lane);
  return __syncthreads_or(!ok) == 0;
}

// Receive, local expert j, the sources in `batch` (complete): scans their headers (warp per 32-token segment; the
// slot masks stay in registers), gives every row its position — source s's rows are [s_off[s], s_off[s + 1]), the
// counts s announced, in (t, k) order inside — records provenance, then warps copy the rows item by item (a row =
// its payload units and then its scale units, 16 bytes each, in pieces of 32 x 8 for fp8 / 32 x 7 for bf16; all of
// a lane's loads in flight) into the caller's slab. A source whose messages hold another number of rows for j than
// it announced is an error (kErrInconsistent); its rows are then not copied.
template <bool kFp8>
__device__ __forceinline__ void place_and_copy(const LlDispatchParams& p, uint8_t* my_half, int j, int tag,
                                               unsigned batch, const int* s_tokens, const int* s_seg_first,
                                               const int* s_off, int* s_seg_base, int num_segments) {
  __shared__ int s_msg[kInfoCache];  // row i -> message slot s * tokens + t
  __shared__ int s_bad;
  __shared__ int s_lo, s_n, s_x0, s_skip;  // the batch's rows: [s_lo, ...) without [s_x0, s_x0 + s_skip), s_n rows
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int R = p.comm.num_ranks, K = p.topk, H = p.hidden;
  const int slab_rows = L.slab_rows();
  int* src_info = p.recv_src_info + static_cast<size_t>(j) * slab_rows;
  const bool first_expert = j == static_cast<int>(blockIdx.x);
  if (tid == 0) {  // the batch is all sources, this rank alone, or all but this rank
    const int me = p.comm.rank;
    const auto clamp = [slab_rows](int v) { return v < slab_rows ? v : slab_rows; };
    const bool own = (batch >> me) & 1u, others = (batch & ~(1u << me)) != 0;
    s_lo = own && !others ? clamp(s_off[me]) : 0;
    s_x0 = own ? slab_rows : clamp(s_off[me]);
    s_skip = own ? 0 : clamp(s_off[me + 1]) - s_x0;
    s_n = (own && !others ? clamp(s_off[me + 1]) : clamp(s_off[R]) - s_skip) - s_lo;
  }

  // Pass 1: rows per 32-token segment of the batch's sources (the first kMaskCache masks of a lane stay in
  // registers for pass 2).
  uint32_t cached[kMaskCache];
  {
    int i = 0;
    for (int seg = warp; seg < num_segments; seg += ll::kWarps, ++i) {
      int s = 0;
      while (s + 1 < R && s_seg_first[s + 1] <= seg) ++s;
      if (!((batch >> s) & 1)) continue;
      const int t = (seg - s_seg_first[s]) * 32 + lane;
      const uint32_t m = slot_mask(L, my_half, s, t, s_tokens[s], tag, j, K);
#pragma unroll
      for (int c = 0; c < kMaskCache; ++c)
        if (c == i) cached[c] = m;
      const int total = __reduce_add_sync(0xffffffffu, __popc(m));
      if (lane == 0) s_seg_base[seg] = total;
    }
  }
  __syncthreads();
  // Exclusive prefix over each source's segments, from the source's first row; the total must be its count.
  if (warp == 0) {
    int bad = 0;
    for (int s = 0; s < R; ++s) {
      if (!((batch >> s) & 1)) continue;
      int carry = s_off[s];
      for (int base = s_seg_first[s]; base < s_seg_first[s + 1]; base += 32) {
        const int seg = base + lane;
        const bool in = seg < s_seg_first[s + 1];
        const int v = in ? s_seg_base[seg] : 0;
        const int inc = ll::warp_inclusive_scan(v);
        if (in) s_seg_base[seg] = carry + inc - v;
        carry += __shfl_sync(0xffffffffu, inc, 31);
      }
      if (carry != s_off[s + 1]) {
        bad = 1;
        if (lane == 0)
          dev::record_error(p.comm, kErrInconsistent, Phase::kLlDispatchRecv, s, carry - s_off[s],
                            s_off[s + 1] - s_off[s]);
      }
    }
    if (lane == 0) s_bad = bad;
  }
  __syncthreads();
  if (first_expert) trace_at(p, kLlTraceRecvScanned);
  // Pass 2: every (s, t, k) gets its row; record provenance for the caller and for combine.
  {
    int i = 0;
    for (int seg = warp; seg < num_segments; seg += ll::kWarps, ++i) {
      int s = 0;
      while (s + 1 < R && s_seg_first[s + 1] <= seg) ++s;
      if (!((batch >> s) & 1)) continue;
      const int t = (seg - s_seg_first[s]) * 32 + lane;
      uint32_t m = 0;
      if (i < kMaskCache) {
#pragma unroll
        for (int c = 0; c < kMaskCache; ++c)
          if (c == i) m = cached[c];
      } else {
        m = slot_mask(L, my_half, s, t, s_tokens[s], tag, j, K);
      }
      const int cnt = __popc(m);
      int row = s_seg_base[seg] + ll::warp_inclusive_scan(cnt) - cnt;
      const int end = s_off[s + 1] < slab_rows ? s_off[s + 1] : slab_rows;  // a token naming one expert several
      while (m) {                                                           // times could overflow the slab
        const int k = __ffs(m) - 1;
        m &= m - 1;
        if (row < end) {
          src_info[row] = (s << 24) | t;
          if (row < kInfoCache) s_msg[row] = s * L.tokens + t;
          p.recv_row[(static_cast<size_t>(s) * L.tokens + t) * L.topk + k] = row;
        }
        ++row;
      }
    }
  }
  __syncthreads();  // s_msg / src_info rows written above are read by other threads below
  if (first_expert) trace_at(p, kLlTraceRecvPlaced);
  if (s_bad) return;
  const int n = s_n, lo = s_lo, x0 = s_x0, skip = s_skip;

  // Pass 3: warp-per-item copy. A row is a run of 16-byte units: its payload chunks, then (fp8) its scales, four
  // float scales per unit. Items = (row, piece of 32 * kCopyBatch units) go to the warps in turn, every lane
  // with all its loads in flight before its stores, so an expert with up to kWarps / 2 fp8 rows of H 7168 (462
  // units = 2 pieces) is copied in one round trip per warp, up to kWarps rows in two. (A block-wide flattened
  // chunk loop took ~0.5 us per row: its time grew with the expert's row count, and the expert with the most
  // rows set the kernel's end. Scale words as separate items added a third round for ~15 rows.)
  constexpr int kCopyBatch = kFp8 ? 8 : 7;  // fp8 H 7168: 462 units = 256 + 206; bf16: 896 chunks = 4 x 224
  constexpr int kItemUnits = 32 * kCopyBatch;
  const int G = H / kScaleGroupElems;
  const bool packed = kFp8 && p.scale_format == 2;
  const int scale_words = kFp8 ? (packed ? (G + 3) / 4 : G) : 0;  // per output row
  const int pay_units = kFp8 ? H / 16 : H / 8;
  const int row_units = pay_units + (kFp8 ? (G + 3) / 4 : 0);
  const int pieces = (row_units + kItemUnits - 1) / kItemUnits;
  const size_t row_bytes = kFp8 ? static_cast<size_t>(H) : 2 * static_cast<size_t>(H);
  uint8_t* out_base = static_cast<uint8_t*>(p.recv_x) + static_cast<size_t>(j) * slab_rows * row_bytes;
  uint32_t* out_scales = static_cast<uint32_t*>(p.recv_scales) + static_cast<size_t>(j) * slab_rows * scale_words;
  for (int item = warp; item < n * pieces; item += ll::kWarps) {
    const int r = item / pieces, piece = item - r * pieces;
    const int i = lo + r < x0 ? lo + r : lo + r + skip;  // the batch's r-th row
    int slot;
    if (i < kInfoCache) {
      slot = s_msg[i];
    } else {
      const int info = src_info[i];
      slot = (info >> 24) * L.tokens + (info & 0xffffff);
    }
    const uint8_t* msg = my_half + L.dispatch_offset + static_cast<size_t>(slot) * L.msg_bytes;
    const int4* pay = reinterpret_cast<const int4*>(msg + kLlHeaderBytes);
    // Unit q >= pay_units: float scales 4q'..4q'+3 (q' = q - pay_units; in bounds: messages are padded to 16 B).
    const int4* sc = reinterpret_cast<const int4*>(msg + L.msg_scale_offset) - pay_units;
    int4* dst = reinterpret_cast<int4*>(out_base + static_cast<size_t>(i) * row_bytes);
    const int u0 = piece * kItemUnits + lane;
    int4 v[kCopyBatch];
#pragma unroll
    for (int u = 0; u < kCopyBatch; ++u) {
      const int q = u0 + 32 * u;
      if (q < row_units) v[u] = dev::ld_v4((kFp8 && q >= pay_units ? sc : pay) + q);
    }
#pragma unroll
    for (int u = 0; u < kCopyBatch; ++u) {
      const int q = u0 + 32 * u;
      if (q >= row_units) continue;
      if (!kFp8 || q < pay_units) {
        dev::st_na_v4(dst + q, v[u]);
      } else {
        const int g0 = 4 * (q - pay_units);  // first scale group of this unit
        const uint32_t f[4] = {static_cast<uint32_t>(v[u].x), static_cast<uint32_t>(v[u].y),
                               static_cast<uint32_t>(v[u].z), static_cast<uint32_t>(v[u].w)};
        uint32_t* srow = out_scales + static_cast<size_t>(i) * scale_words;
        if (packed) {  // one word: the exponent bytes of groups g0..g0+3 (absent groups 0)
          uint32_t e = 0;
#pragma unroll
          for (int b = 0; b < 4; ++b)
            if (g0 + b < G) e |= ((f[b] >> 23) & 0xffu) << (8 * b);
          srow[g0 / 4] = e;
        } else {
#pragma unroll
          for (int b = 0; b < 4; ++b)
            if (g0 + b < G) srow[g0 + b] = f[b];
        }
      }
    }
  }
  if (first_expert) trace_at(p, kLlTraceRecvCopied);
}

// Receive: warp-collective. Loads every source's announced row count for local expert j (expert_count[s][j],
// waiting for this dispatch's tag) into s_off as an exclusive prefix in rank order (s_off[R] = all rows). Returns
// false in the lanes whose wait failed.
__device__ __forceinline__ bool load_counts(const LlDispatchParams& p, uint8_t* my_half, int j, long long epoch_tag,
                                            int* s_off) {
  const int lane = threadIdx.x % 32, R = p.comm.num_ranks;
  bool ok = true;
  int c = 0;
  if (lane < R) {
    const long long* word = p.layout.expert_count(my_half, lane, j);
    ok = dev::wait_geq(p.comm, word, epoch_tag << 32, Phase::kLlDispatchRecv, lane);
    c = static_cast<int>(dev::ld_relaxed_sys(word) & 0xffffffffll);
  }
  const int inc = ll::warp_inclusive_scan(c);
  if (lane < R) s_off[lane] = inc - c;
  if (lane == R - 1) s_off[R] = inc;
  return ok;
}

// Receive, one local expert j whose counts are in s_off and whose own source is complete: with `split` (some other
// source was not complete yet) this rank's own rows first, then the others once they are complete; otherwise all
// sources in one batch. Returns false when a wait failed.
template <bool kFp8>
__device__ __forceinline__ bool recv_expert(const LlDispatchParams& p, uint8_t* my_half, LlControl* ctrl, int j,
                                            long long epoch_tag, bool split, const int* s_off, const int* s_tokens,
                                            const int* s_seg_first, int* s_seg_base, int num_segments) {
  const int me = p.comm.rank, R = p.comm.num_ranks;
  const unsigned all = (1u << R) - 1u, own = 1u << me;
  for (int round = 0; round < (split ? 2 : 1); ++round) {
    if (round == 1 && !wait_sources(p, ctrl, all & ~own, epoch_tag)) return false;
    const unsigned batch = !split ? all : round == 0 ? own : all & ~own;
    place_and_copy<kFp8>(p, my_half, j, static_cast<int>(epoch_tag), batch, s_tokens, s_seg_first, s_off, s_seg_base,
                         num_segments);
  }
  if (threadIdx.x == 0) {
    const int n = s_off[R] < p.layout.slab_rows() ? s_off[R] : p.layout.slab_rows();
    p.recv_count[j] = n;
    if (p.cumulative_stats != nullptr) p.cumulative_stats[j] += n;
  }
  __syncthreads();  // s_seg_base / s_off / s_msg are reused by the next expert
  return true;
}

template <bool kFp8>
__global__ void __launch_bounds__(ll::kThreads, ll::kBlocksPerSm)
    llDispatchKernel(const __grid_constant__ LlDispatchParams p) {
  __shared__ int s_tokens[kLlMaxRanks];
  __shared__ int s_seg_first[kLlMaxRanks + 1];
  __shared__ int s_seg_base[kMaxSegments];
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int me = p.comm.rank, R = p.comm.num_ranks;
  const int b = blockIdx.x, grid = gridDim.x;
  uint8_t* my_half = ll::half_of(p.comm, me, p.half_offset);
  LlControl* ctrl = L.control(my_half);
  trace_at(p, kLlTraceEntry);
  // The epoch counts receive blocks' arrival shares; a block of an earlier receive kernel that has not added
  // its share yet leaves it below the next multiple, and a kernel reads it before its own blocks add theirs.
  const long long epoch_tag = *reinterpret_cast<volatile long long*>(&ctrl->dispatch_epoch) / kLlArrivalUnits + 1;
  const int tag = static_cast<int>(epoch_tag);
  trace_at(p, kLlTraceTag);

  if (p.do_send) {
    // Items and arrival: send_roles.h (local item t on block t % grid, remote item t on block grid - 1 - t % grid).
    const int T = p.num_tokens;
    const ll::SendRoles roles = ll::send_roles(b, grid, T, R);
    const int senders = roles.senders, remote_index = roles.remote_index, count_block = roles.count_block;
    const bool local_arrives = roles.local_arrives, remote_arrives = roles.remote_arrives;
    const bool has_items = roles.has_items;
    if (local_arrives || remote_arrives || b == count_block) {
      // Peers must have consumed what this rank sent them in the previous dispatch on this half before it is
      // overwritten. Block 0 (it rewrites the peers' dispatch_flag[me] first, so that they learn T early), the
      // count block and blocks without items wait here; the others in their first item (overlapped with its
      // loads and routing).
      const bool wait_first = b == 0 || b == count_block || !has_items;
      if (wait_first) {
        bool ok = true;
        if (tid < R)
          ok = dev::wait_geq(p.comm, &ctrl->dispatch_ack[tid], (epoch_tag - 1) * kLlArrivalUnits,
                             Phase::kLlDispatchRecv, tid);
        if (__syncthreads_or(!ok)) return;
        if (b == 0 && tid < R)
          L.control(ll::half_of(p.comm, tid, p.half_offset))->dispatch_flag[me] =
              (epoch_tag << 32) | static_cast<long long>(T);
        if (b == count_block) count_experts(p, epoch_tag);
      }
      const long long* ack = wait_first ? nullptr : ctrl->dispatch_ack;
      // Remote items first (the NVLink transfer is the critical path), then local ones; one call site.
      bool remote = R > 1 && remote_index < T;
      for (int t = remote ? remote_index : b; t < T;) {
        TokenLoads tl;
        load_token<kFp8>(p, t, tl);
        if (!send_token<kFp8>(p, t, tag, remote ? ~(1 << me) : 1 << me, ack, epoch_tag - 1, tl)) return;
        ack = nullptr;
        t += grid;
        if (remote && t >= T) {
          remote = false;
          t = b;
        }
      }
      // Per-block arrival: the release add (after the block barrier) publishes this block's stores; no grid-wide
      // counter, no last block.
      trace_at(p, kLlTraceSendStored);
      __syncthreads();
      // The own rank's counter is released at gpu scope (its readers are this GPU's blocks): a system-scope
      // release waited as long as the remote blocks' NVLink stores (trace: ~3.3 us) even in blocks that stored
      // only locally.
      if (tid < R && (tid == me ? local_arrives : remote_arrives)) {
        LlControl* peer_ctrl = L.control(ll::half_of(p.comm, tid, p.half_offset));
        if (tid == me)
          dev::red_add_release_gpu(&peer_ctrl->dispatch_count[me], ll::arrival_share(b, senders));
        else
          dev::red_add_release_sys(&peer_ctrl->dispatch_count[me], ll::arrival_share(remote_index, senders));
      }
      trace_at(p, kLlTraceSendArrived);
    } else if (!p.do_recv) {
      return;
    }
  }

  if (p.do_recv) {
    // Blocks with local experts wait, expand and arrive (block 0 arrives even without experts); the others
    // return at once.
    const int E_l = L.num_local_experts;
    const int receivers = E_l < grid ? (E_l > 0 ? E_l : 1) : grid;
    if (b >= receivers) return;
    if (b < E_l) {
      // At once, one round trip when the data is already there: warp 0 waits for every source's token count (its
      // block 0 stores it first thing), warp 1 for every source's row count of the first expert, warp 2 for this
      // rank's own messages (its local send blocks) and looks, without waiting, whether the others are complete.
      __shared__ int s_off[kLlMaxRanks + 1];
      bool ok = true, pending = false;
      if (warp == 0) {
        if (lane < R) {
          ok = dev::wait_geq(p.comm, &ctrl->dispatch_flag[lane], epoch_tag << 32, Phase::kLlDispatchRecv, lane);
          const int tokens = static_cast<int>(dev::ld_relaxed_sys(&ctrl->dispatch_flag[lane]) & 0xffffffffll);
          s_tokens[lane] = tokens < L.tokens ? tokens : L.tokens;
        }
      } else if (warp == 1) {
        ok = load_counts(p, my_half, b, epoch_tag, s_off);
      } else if (warp == 2 && lane < R) {
        if (lane == me)
          ok = dev::wait_geq(p.comm, &ctrl->dispatch_count[lane], epoch_tag * kLlArrivalUnits, Phase::kLlDispatchRecv,
                             lane);
        else
          pending = dev::ld_acquire_sys(&ctrl->dispatch_count[lane]) < epoch_tag * kLlArrivalUnits;
      }
      if (__syncthreads_or(!ok)) return;
      bool split = __syncthreads_or(pending) != 0;
      trace_at(p, kLlTraceRecvReady);
      if (tid == 0) {
        int first = 0;
        for (int s = 0; s < R; ++s) {
          s_seg_first[s] = first;
          first += (s_tokens[s] + 31) / 32;
        }
        s_seg_first[R] = first;
      }
      __syncthreads();
      const int num_segments = s_seg_first[R];
      for (int j = b; j < E_l; j += grid) {
        if (j != b && __syncthreads_or(warp == 0 && !load_counts(p, my_half, j, epoch_tag, s_off))) return;
        if (!recv_expert<kFp8>(p, my_half, ctrl, j, epoch_tag, split, s_off, s_tokens, s_seg_first, s_seg_base,
                               num_segments))
          return;
        split = false;  // every source is complete after the first expert
      }
    }
    // Per-block arrival: the adds (after the block barrier) tell every source that this block is done reading
    // its messages and counts. They are relaxed, not release: what they must follow is the block's READS, and
    // every one of those has returned its value before the barrier (each loaded value was handed to a store
    // issued before it), so a source's later overwrite cannot reach them. A release would also wait for the
    // block's ~50 KB of slab writes to complete at system scope, which nobody on the peers needs (the trace put
    // that wait at ~2-3 us at 128 tokens). The epoch share (local, relaxed) is read by later kernels only (a
    // kernel of this half that reads a partly added epoch still computes the right tag: the shares complete a
    // multiple of kLlArrivalUnits only when every receiving block has added).
    const long long share = ll::arrival_share(b, receivers);
    __syncthreads();
    if (tid < R) {
      LlControl* peer_ctrl = L.control(ll::half_of(p.comm, tid, p.half_offset));
      dev::red_add_relaxed_sys(&peer_ctrl->dispatch_ack[me], share);
    }
    if (tid == 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&ctrl->dispatch_epoch), static_cast<unsigned long long>(share));
    trace_at(p, kLlTraceExit);
  }
}

}  // namespace

ncclResult_t opLlDispatch(ncclMoeComm* comm, ncclMoeHandle* handle, const ncclMoeLLDispatchArgs_t& args,
                          cudaStream_t stream) {
  LlRouting& r = handle->ll;
  const bool do_send = (args.phase & ncclMoePhaseSend) != 0;
  const bool do_recv = (args.phase & ncclMoePhaseRecv) != 0;
  const char* api = "ncclMoeLowLatencyDispatch";
  if (!do_send && !r.recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: phase is ncclMoePhaseRecv but this handle has no send half waiting for its receive "
                        "half (call it with ncclMoePhaseSend first)",
                        api);
  }
  if (do_send && r.recv_pending) {
    return setLastError(ncclInvalidUsage,
                        "%s: this handle's previous send half (ncclMoePhaseSend) has not been received yet; call "
                        "it with ncclMoePhaseRecv first",
                        api);
  }
  const LlLayout& L = comm->layout.ll;
  if (L.num_local_experts > 32767) {
    return setLastError(ncclInvalidArgument, "%s: %d local experts; the low-latency kernels support at most 32767", api,
                        L.num_local_experts);
  }
  if (do_send) {
    r.half = comm->ll_next_half;
    comm->ll_next_half ^= 1;
    r.num_tokens = args.num_tokens;
    r.topk = args.topk;
    r.hidden = args.hidden;
    r.use_fp8 = args.use_fp8;
    r.scale_format = static_cast<int>(args.scale_format);
    r.idx_int32 = args.topk_idx_type == ncclMoeIndexInt32;
    r.dispatch_weights = args.topk_weights != nullptr;
    r.valid = true;
  } else if (args.hidden != r.hidden || args.use_fp8 != r.use_fp8 || args.topk != r.topk ||
             (args.use_fp8 && static_cast<int>(args.scale_format) != r.scale_format)) {
    return setLastError(ncclInvalidArgument,
                        "%s: the receive half's hidden/topk/use_fp8/scale_format (%d/%d/%d/%d) differ from its send "
                        "half's (%d/%d/%d/%d)",
                        api, args.hidden, args.topk, args.use_fp8, static_cast<int>(args.scale_format), r.hidden,
                        r.topk, r.use_fp8, r.scale_format);
  }

  LlDispatchParams p{};
  p.comm = comm->deviceComm();
  p.layout = L;
  p.half_offset = comm->layout.ll_offset + static_cast<size_t>(r.half) * comm->layout.ll_half_bytes;
  p.x = args.x;
  p.topk_idx = args.topk_idx;
  p.idx_int32 = args.topk_idx_type == ncclMoeIndexInt32;
  p.num_tokens = r.num_tokens;
  p.hidden = r.hidden;
  p.topk = r.topk;
  p.use_fp8 = r.use_fp8;
  p.scale_format = r.scale_format;
  p.recv_x = args.recv_x;
  p.recv_scales = args.recv_x_scales;
  p.recv_count = args.recv_count;
  p.cumulative_stats = args.cumulative_recv_stats;
  p.recv_src_info = r.recv_src_info;
  p.recv_row = r.recv_row;
  p.topk_weights = do_send ? args.topk_weights : nullptr;
  p.do_send = do_send;
  p.do_recv = do_recv;
  p.trace = comm->ll_dispatch_trace;

  const dim3 block(ll::kThreads);
  if (r.use_fp8)
    llDispatchKernel<true><<<ll::grid_blocks<llDispatchKernel<true>>(comm->num_device_sms), block, 0, stream>>>(p);
  else
    llDispatchKernel<false><<<ll::grid_blocks<llDispatchKernel<false>>(comm->num_device_sms), block, 0, stream>>>(p);
  MOE_CUDA_CHECK(cudaGetLastError());
  r.recv_pending = do_send && !do_recv;
  return ncclSuccess;
}

}  // namespace nccl_moe
