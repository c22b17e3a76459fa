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
// Regions (src/mem/ll_layout.h, one LL half chosen by the host (src/ops/ll.cc), alternating per dispatch):
//   sender s writes into each destination d: dispatch message slot (s, t) (header + payload + scales),
//   d.control.dispatch_flag[s] and d.control.dispatch_count[s]; receiver d writes back s.control.dispatch_ack[d]. With
//   args.topk_weights the header also carries the token's K weights (read by the combine's send half: no weight
//   exchange there).
//
// Deduplication: a token is sent ONCE per destination rank (its header lists the local expert of every slot
// that lives there); the receiver expands it into one row per (expert, slot). Bytes over NVLink per token
// and peer: 128 + H (fp8) + 4*H/128, or 128 + 2H (bf16); 128 (the header alone) to a peer holding none of its
// experts.
//
// Roles (grid = kBlocksPerSm blocks on every SM, kThreads per block):
//   send:  block b casts/copies tokens t = b, b + grid, ... (all threads on one row, 16 channels a thread for
//          fp8: 8 lanes = one 128-channel scale group; the row is loaded while warp 0 resolves the routing and
//          warp 1 waits for the peers' acks). Block 0 then stores d.dispatch_flag[s] = (tag << 32) | T into every
//          rank d. The token's header goes to EVERY rank (its slot words name the local experts there, all -1
//          where it has none); its payload and scales go to the ranks holding one of its experts (the header by
//          eight lanes, the fp8 scales staged in shared memory and stored by one warp per destination, in
//          whole 16-byte vectors). Each block with tokens (and block 0) then adds its arrival share to
//          d.dispatch_count[s] of every peer d with a release.
//   recv:  receive index b (receive_index: from the grid's last block in a Both kernel) owns local experts
//          j = b, b + grid, ...: waits for every source's token flag, scans the headers of all R * T_s slots
//          AS THEY ARRIVE (warp per 32-token segment, each lane polling its message's tagged slot words; the
//          slot masks stay in registers), block prefix, which gives every row's position in (s, t, k) order
//          (row -> message index kept in shared memory); only then waits for every source's count shares (the
//          rows complete), and warps copy the rows item by item (a row = its payload units and then its scale
//          units, 16 bytes each, in pieces of 32 x 8 for fp8 / 32 x 7 for bf16; all of a lane's loads in
//          flight) into the caller's slab. With at least two receive indices per local expert, indices
//          j + k * E_l (k < team) help j copy (receive_teams.h). Every receiving block adds its share to every
//          source's s.dispatch_ack[d] (relaxed) and to the half's dispatch epoch.
//
// Signalling: tag = control.dispatch_epoch + 1 of this half, read from device memory (so a captured graph
// stays valid across replays; every rank runs the same sequence of LL calls, so every rank's epoch of a half
// agrees). Every slot word of a header carries the tag and is a single-copy-atomic 64-bit element
// (LlMsgHeader), so a receiver may read a header while it is being written, and slots of earlier dispatches
// are recognised without clearing anything. Before writing into d, a sender waits for d's ack of tag - 1 (d
// finished reading the previous messages of this half). Every wait is bounded (wait.cuh; the header polls
// too); a failed wait leaves the kernel (its block does not arrive, so no later flag is published and peers
// fail in turn).
//
// Launch constraints: H % 128 == 0 with fp8 (H % 8 == 0 for bf16), T <= tokens of the layout (<= 4096),
// K <= 16, E_l <= 32767. Phase split: the send half (do_send) returns after the last block's count-share adds;
// the receive half (do_recv) is a separate launch; phase Both runs both in one kernel.
#include <cuda_runtime.h>

#include "kernels/low_latency/args.h"
#include "kernels/low_latency/common.cuh"
#include "kernels/low_latency/receive_teams.h"
#include "kernels/low_latency/trace.h"

namespace nccl_moe {
namespace {

constexpr int kMaxSegments = kMaxNvlPeers * (4096 / 32);  // 32-token segments over all sources

// The block's index in the receive roles (experts, teams, arrival shares). In a Both kernel it counts from the
// grid's last block: with T <= grid / 2 the blocks that scan and place headers are not the ones waiting for the
// release of their own sends (2 H200, 128 tokens: dispatch 16.2 -> 15.5 us; 4 H200: 21.2 us). A receive-only
// kernel counts from block 0, the first blocks to start.
__device__ __forceinline__ int receive_index(const LlDispatchArgs& p) {
  return p.do_send ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
}

// Stores the time of `point` for this block when tracing (thread 0 only).
__device__ __forceinline__ void trace_at(const LlDispatchArgs& p, int point) {
  if (p.trace != nullptr && threadIdx.x == 0)
    p.trace[static_cast<size_t>(blockIdx.x) * kLlTracePoints + point] = dev::globaltimer_ns();
}

// ---------------------------------------------------------------------------------------------------------
// Send
// ---------------------------------------------------------------------------------------------------------

constexpr int kSendUnroll = 2;  // bf16: 8-channel chunks per thread in flight

// Sends token t. Its first row loads (this thread's first chunk(s)) are issued before its routing is resolved, so
// the two round trips overlap. (Issuing them before the kernel reads the epoch was tried: the loads then stay live
// across the kernel's prologue and both kernels spill.) With `ack` (the block's first token), warp 1 waits for
// every peer's ack of `ack_tag` (it consumed the previous messages of this half; normally long there) while
// warp 0 resolves the routing; nothing is stored into a peer before. Returns false when that wait failed.
template <bool kFp8>
__device__ __forceinline__ bool send_token(const LlDispatchArgs& p, int t, int tag, const long long* ack,
                                           long long ack_tag) {
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
      const int e = dev::load_topk_id(p.topk_idx, p.idx_int32, static_cast<size_t>(t) * K + lane, R * El);
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
  if (ack != nullptr && warp == 1 && lane < R)
    ok = dev::wait_geq(p.comm, &ack[lane], ack_tag * kLlArrivalUnits, Phase::kLlDispatchRecv, lane);
  if (__syncthreads_or(!ok)) return false;
  const int mask = s_mask;
  // Block 0 publishes the token count as soon as the peers have consumed the previous messages of this half:
  // receivers then know which headers to wait for and scan them as they arrive (the data is complete only at
  // the senders' count shares).
  if (ack != nullptr && blockIdx.x == 0 && tid < R)
    dev::st_relaxed_sys(&ll::control(L, ll::half_of(p.comm, tid, p.half_offset))->dispatch_flag[me],
                        (static_cast<long long>(tag) << 32) | static_cast<long long>(p.num_tokens));

  // Header, to EVERY rank (receivers wait for the header of each of the source's tokens): eight lanes per
  // destination, in two instructions (two 64-byte writes). Lanes 0-3: the tagged slot words 2i, 2i + 1 (local
  // experts of slots 4i..4i+3) as 64-bit elements; lanes 4-7: the weights of slots 4(i-4)...
  if (tid < 8 * R) {
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
      int4* dst =
          reinterpret_cast<int4*>(ll::dispatch_msg(L, ll::half_of(p.comm, warp, p.half_offset), me, t) + L.msg_scale_offset);
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

// ---------------------------------------------------------------------------------------------------------
// Receive
// ---------------------------------------------------------------------------------------------------------

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

template <bool kFp8>
__device__ __forceinline__ bool recv_expert(const LlDispatchArgs& p, uint8_t* my_half, int j, int tag, int team,
                                            bool rows_here, const int* s_tokens, const int* s_seg_first,
                                            int* s_seg_base, int num_segments) {
  __shared__ int s_total;
  __shared__ int s_failed;
  __shared__ int s_msg[kInfoCache];  // row i -> message slot s * tokens + t
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int R = p.comm.num_ranks, K = p.topk;
  const int slab_rows = L.slab_rows();
  int* src_info = p.recv_src_info + static_cast<size_t>(j) * slab_rows;

  // Pass 1: rows per 32-token segment, each lane waiting for its message's header (they arrive before the rows;
  // the first kMaskCache masks of a lane stay in registers for pass 2).
  if (tid == 0) s_failed = 0;
  __syncthreads();
  uint32_t cached[kMaskCache];
  {
    int i = 0;
    for (int seg = warp; seg < num_segments; seg += ll::kWarps, ++i) {
      int s = 0;
      while (s + 1 < R && s_seg_first[s + 1] <= seg) ++s;
      const int t = (seg - s_seg_first[s]) * 32 + lane;
      uint32_t m = 0;
      if (t < s_tokens[s] && !header_mask(L, my_half, s, t, tag, j, K, &m) &&
          !wait_header(p, my_half, s, t, tag, j, &m))
        s_failed = 1;
#pragma unroll
      for (int c = 0; c < kMaskCache; ++c)
        if (c == i) cached[c] = m;
      const int total = __reduce_add_sync(0xffffffffu, __popc(m));
      if (lane == 0) s_seg_base[seg] = total;
    }
  }
  __syncthreads();
  if (s_failed) return false;
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
  bool ok = true;
  if (!rows_here && warp == 0 && lane < R)
    ok = dev::wait_geq(p.comm, &ll::control(L, my_half)->dispatch_count[lane], static_cast<long long>(tag) * kLlArrivalUnits,
                       Phase::kLlDispatchRecv, lane);
  if (__syncthreads_or(!ok)) return false;  // also: s_msg / src_info rows written above are read below
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
  return true;
}

template <bool kFp8>
__global__ void __launch_bounds__(ll::kThreads, ll::kBlocksPerSm)
    llDispatchKernel(const __grid_constant__ LlDispatchArgs p) {
  __shared__ int s_tokens[kMaxNvlPeers];
  __shared__ int s_seg_first[kMaxNvlPeers + 1];
  __shared__ int s_seg_base[kMaxSegments];
  const LlLayout& L = p.layout;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int me = p.comm.rank, R = p.comm.num_ranks;
  uint8_t* my_half = ll::half_of(p.comm, me, p.half_offset);
  LlControl* ctrl = ll::control(L, my_half);
  trace_at(p, kLlTraceEntry);
  if (p.trace != nullptr && tid == 0) {
    p.trace[static_cast<size_t>(blockIdx.x) * kLlTracePoints + kLlTraceSm] = dev::sm_id();
  }
  // The epoch counts receive blocks' arrival shares; a block of an earlier receive kernel that has not added
  // its share yet leaves it below the next multiple, and a kernel reads it before its own blocks add theirs.
  // Thread 0 loads it for the block: every warp of every block loading the same word queued at one L2 slice
  // (~4000 requests; the trace had the median block's epoch 1 us after the kernel's start).
  __shared__ long long s_epoch;
  if (tid == 0) s_epoch = *reinterpret_cast<volatile long long*>(&ctrl->dispatch_epoch);
  __syncthreads();
  const long long epoch_tag = s_epoch / kLlArrivalUnits + 1;
  const int tag = static_cast<int>(epoch_tag);
  trace_at(p, kLlTraceTag);

  if (p.do_send) {
    // Peers must have consumed what this rank sent them in the previous dispatch on this half before it is
    // overwritten: the first token of a block waits for that inside send_token (overlapped with its loads).
    // Only blocks with tokens arrive, and block 0 always (it also rewrites the peers' dispatch_flag[me], so it
    // waits here when it has no token; so do the token-less blocks of a Both kernel, on their way to the
    // receive part). Token-less blocks of a send-only kernel return at once.
    if (static_cast<int>(blockIdx.x) >= p.num_tokens) {
      if (blockIdx.x > 0 && !p.do_recv) return;
      bool ok = true;
      if (tid < R)
        ok = dev::wait_geq(p.comm, &ctrl->dispatch_ack[tid], (epoch_tag - 1) * kLlArrivalUnits, Phase::kLlDispatchRecv,
                           tid);
      if (__syncthreads_or(!ok)) return;
    }
    for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
      const bool first = t == static_cast<int>(blockIdx.x);
      if (!send_token<kFp8>(p, t, tag, first ? ctrl->dispatch_ack : nullptr, epoch_tag - 1)) return;
    }
    // Per-block arrival at every peer: the release add (after the block barrier) publishes this block's
    // stores; no grid-wide counter, no last block. Block 0 without tokens stores the count (0) before its add.
    const int b = blockIdx.x, grid = gridDim.x;
    if (b < p.num_tokens || b == 0) {
      const int senders = p.num_tokens < grid ? (p.num_tokens > 0 ? p.num_tokens : 1) : grid;
      trace_at(p, kLlTraceSendStored);
      __syncthreads();
      if (tid < R) {
        LlControl* peer_ctrl = ll::control(L, ll::half_of(p.comm, tid, p.half_offset));
        if (b == 0 && p.num_tokens == 0)  // (with tokens, send_token published it before the rows)
          peer_ctrl->dispatch_flag[me] = epoch_tag << 32;
        dev::red_add_release_sys(&peer_ctrl->dispatch_count[me], ll::arrival_share(b, senders));
      }
      trace_at(p, kLlTraceSendArrived);
    }
  }

  if (p.do_recv) {
    const int b = receive_index(p), grid = gridDim.x;
    // Receive indices b (receive_index) with local experts wait, expand and arrive (index 0 arrives even without
    // experts); the others return at once.
    const int E_l = L.num_local_experts;
    // Receive teams (receive_teams.h): on 4 ranks only 72 of 264 blocks received, with up to ~25 rows each.
    const ll::ReceiveTeams rt = ll::receive_teams(E_l, grid);
    const int team = rt.team, receivers = rt.receivers;
    if (b >= receivers) return;
    if (team > 1 && b >= E_l) {
      // A team member: waits for block j's placement, then copies its share of expert j's rows.
      __shared__ int s_rows;
      const int member = b / E_l, j = b - member * E_l;
      if (tid == 0) {
        const long long* word = ll::expert_ready(L, my_half, j);
        // Long by construction (the peers' data, then block j's scan and placement): polls every ~200 ns.
        const bool ok = dev::wait_geq(p.comm, word, epoch_tag << 32, Phase::kLlDispatchRecv, -1, 200u);
        s_rows = ok ? static_cast<int>(dev::ld_relaxed_sys(word) & 0xffffffffll) : -1;
      }
      __syncthreads();
      if (s_rows < 0) return;
      copy_rows<kFp8>(p, my_half, j, s_rows, member * ll::kWarps + warp, team * ll::kWarps, nullptr);
    } else if (b < E_l) {
      // Every source's token count (block 0 of the source publishes it before its rows, so it is this
      // dispatch's once its tag is there). recv_expert scans the headers as they arrive and waits for the
      // sources' count shares (the rows complete) only before its copy.
      // Warp 1 meanwhile looks (acquire) whether the rows are complete already, as for a receive-only kernel
      // after its send half: then recv_expert does not wait for them a second time.
      __shared__ int s_rows_here;
      bool ok = true;
      if (warp == 0 && lane < R) {
        ok = dev::wait_geq(p.comm, &ctrl->dispatch_flag[lane], epoch_tag << 32, Phase::kLlDispatchRecv, lane);
        const int tokens = static_cast<int>(dev::ld_relaxed_sys(&ctrl->dispatch_flag[lane]) & 0xffffffffll);
        s_tokens[lane] = tokens < L.tokens ? tokens : L.tokens;
      } else if (warp == 1) {
        const bool here = lane >= R || dev::ld_acquire_sys(&ctrl->dispatch_count[lane]) >= epoch_tag * kLlArrivalUnits;
        const bool all_here = __all_sync(0xffffffffu, here);
        if (lane == 0) s_rows_here = all_here;
      }
      if (__syncthreads_or(!ok)) return;
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
      for (int j = b; j < L.num_local_experts; j += gridDim.x)
        if (!recv_expert<kFp8>(p, my_half, j, tag, team, s_rows_here != 0, s_tokens, s_seg_first, s_seg_base,
                               num_segments))
          return;
    }
    // Per-block arrival: the adds (after the block barrier) tell every source that this block is done reading
    // its messages. They are relaxed, not release: what they must follow is the block's READS of the messages,
    // and every one of those has returned its value before the barrier (each loaded value was handed to a store
    // issued before it), so a source's later overwrite cannot reach them. A release would also wait for the
    // block's ~50 KB of slab writes to complete at system scope, which nobody on the peers needs (the trace put
    // that wait at ~2-3 us at 128 tokens). The epoch share (local, relaxed) is read by later kernels only (a
    // kernel of this half that reads a partly added epoch still computes the right tag: the shares complete a
    // multiple of kLlArrivalUnits only when every receiving block has added).
    const long long share = ll::arrival_share(b, receivers);
    __syncthreads();
    if (tid < R) {
      LlControl* peer_ctrl = ll::control(L, ll::half_of(p.comm, tid, p.half_offset));
      dev::red_add_relaxed_sys(&peer_ctrl->dispatch_ack[me], share);
    }
    if (tid == 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&ctrl->dispatch_epoch), static_cast<unsigned long long>(share));
    trace_at(p, kLlTraceExit);
  }
}

}  // namespace

cudaError_t launchLlDispatch(const LlDispatchArgs& a, cudaStream_t stream) {
  const dim3 block(ll::kThreads);
  if (a.use_fp8)
    llDispatchKernel<true><<<ll::grid_blocks<llDispatchKernel<true>>(a.num_sms), block, 0, stream>>>(a);
  else
    llDispatchKernel<false><<<ll::grid_blocks<llDispatchKernel<false>>(a.num_sms), block, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace nccl_moe
