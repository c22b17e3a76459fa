// Layout of one low-latency half (BufferLayout holds two, used alternately; see nccl_moe.h). Owned by the
// low-latency kernels (src/kernels/low_latency/); the ONE definition of every LL offset, used by the size
// query, the allocator and the kernels alike.
//
// One half of rank d's buffer, regions in this order (each on a kRegionAlign boundary):
//
//   persist     LlPersist: reset barrier counters. Never zeroed (only half 0's copy is used).
//   control     LlControl: this rank's epochs and arrival counters (local), then flags written by peers
//               (dispatch_flag / dispatch_ack / combine_weight_flag / combine_flag, indexed by the writer).
//   ready       [E_l] int64: (tag << 32) | rows of local expert j, published by the block that placed expert j's rows
//               of dispatch `tag` for the helper blocks that copy part of them (receive teams, dispatch.cu).
//   dispatch    [R src][tokens] messages, slot (s, t) = token t of source rank s. A token is sent once per
//               destination RANK (not once per expert). Message = LlMsgHeader (128 B: tagged local expert
//               and top-k weight of every slot) | payload (H fp8 bytes or 2H bf16 bytes; room for 2*hidden) |
//               scales (G floats, fp8 only).
//   weights     [R src][tokens * topk] float32: top-k weights source s pushed at the start of its combine
//               (only when the combine was given weights; otherwise it uses the dispatch headers' weights).
//   comb_recv   [R expert rank][tokens][hidden] bf16: per-rank partial sums of token t returned by rank d.
//   comb_buffer [E_l][R * tokens][H] bf16: zero-copy combine input (ncclMoeLowLatencyCombineBuffer); its
//               row stride is the H of the dispatch. Largest region; never zeroed.
//
// ncclMoeLowLatencyReset zeroes [control_offset, combine_buffer_offset) of both halves.
#pragma once

#include <cstddef>
#include <cstdint>

#include "device/limits.h"
#include "mem/layout_params.h"

namespace nccl_moe {

constexpr size_t kLlHeaderBytes = 128;  // sizeof(LlMsgHeader)
constexpr size_t kLlMsgAlign = 128;     // dispatch message slots are whole 128-byte lines
// Per-block arrival: every block of a grid adds its share of kLlArrivalUnits (the shares of one grid sum to
// exactly this, whatever the grid size), so a counter is complete for call `tag` at tag * kLlArrivalUnits.
constexpr long long kLlArrivalUnits = 1ll << 20;

// First 128 bytes of a dispatch message. slot_word[i] = tag (bits 0..31) | local expert of slot 2i on the
// destination rank (bits 32..47) | of slot 2i + 1 (bits 48..63), each -1 when the slot is unused or its expert
// lives elsewhere (ll_slot_word / ll_slot_tag / ll_slot_expert). `tag` = low 32 bits of the dispatch epoch.
// Every word carries the tag and is stored and loaded as one 64-bit element (single-copy atomic), so a receiver
// may read the words while they are being written: a word with this dispatch's tag is this dispatch's. A sender
// writes the header of every token to every rank (the words of a rank holding none of its slots are all -1),
// so a receiver that knows the source's token count knows which headers to wait for. weight[k] =
// topk_weights[t, k] when the dispatch was given weights (read by the combine's send half, after the dispatch).
struct LlMsgHeader {
  uint64_t slot_word[kMaxTopk / 2];
  float weight[kMaxTopk];
};
__host__ __device__ inline uint64_t ll_slot_word(uint32_t tag, uint32_t expert_pair) {
  return static_cast<uint64_t>(tag) | (static_cast<uint64_t>(expert_pair) << 32);
}
__host__ __device__ inline uint32_t ll_slot_tag(uint64_t word) { return static_cast<uint32_t>(word); }
// Local expert of slot 2i + odd of word i (-1: none here).
__host__ __device__ inline int ll_slot_expert(uint64_t word, int odd) {
  return static_cast<int16_t>(static_cast<uint16_t>(word >> (32 + 16 * odd)));
}
static_assert(sizeof(LlMsgHeader) == kLlHeaderBytes, "header size");

// Reset barrier, counted per pair of ranks (a barrier of ncclMoeSetRankMask leaves the masked ranks out, so ranks
// may have passed different numbers of barriers): reset_flag[s] = barriers rank s has entered together with this
// rank (written by s), reset_seen[s] = those this rank has passed (local).
struct LlPersist {
  long long reset_flag[kMaxNvlPeers];
  long long reset_seen[kMaxNvlPeers];
};

struct LlControl {
  // ---- written only by this rank ----
  long long dispatch_epoch;   // receive blocks' arrival shares (kLlArrivalUnits per dispatch received on this
                              // half); the next dispatch's tag is dispatch_epoch / kLlArrivalUnits + 1
  long long combine_epoch;    // combines completed on this half
  int dispatch_send_arrived;  // unused since round 3 (dispatch arrives per block)
  int dispatch_recv_arrived;  // unused since round 3
  // (combine_*_arrived: last-block-done counters, back to 0 after each kernel)
  int combine_send_arrived;
  int combine_recv_arrived;
  long long pad0[12];
  // ---- written by peers; [s] is written by rank s ----
  long long dispatch_flag[kMaxNvlPeers];        // (tag << 32) | T_s, written by s's send block 0
  long long dispatch_ack[kMaxNvlPeers];         // s's receive blocks' shares: s consumed the messages of tag
                                                // once >= tag * kLlArrivalUnits
  long long combine_weight_flag[kMaxNvlPeers];  // s pushed its top-k weights of combine `tag`
  long long combine_flag[kMaxNvlPeers];         // all partial sums of combine `tag` from s are here
  long long combine_ack[kMaxNvlPeers];          // s finished reading the partials of its combine `tag` of this half
  long long dispatch_count[kMaxNvlPeers];       // s's send blocks' shares: all of s's messages of `tag` are
                                                // here once >= tag * kLlArrivalUnits
};

struct LlLayout {
  int num_ranks = 0, tokens = 0, hidden = 0, topk = 0, num_local_experts = 0, num_scale_groups = 0;
  size_t msg_bytes = 0;         // one dispatch message
  size_t msg_scale_offset = 0;  // offset of the scales inside a message
  size_t persist_offset = 0, control_offset = 0, ready_offset = 0, dispatch_offset = 0, weights_offset = 0,
         comb_recv_offset = 0, comb_buffer_offset = 0, total_bytes = 0;

  __host__ __device__ static LlLayout make(const LayoutParams& p) {
    LlLayout l;
    l.num_ranks = p.num_ranks;
    l.tokens = p.ll_tokens;
    l.hidden = p.hidden;
    l.topk = p.max_topk;
    l.num_local_experts = p.num_ranks > 0 ? p.num_experts / p.num_ranks : 0;
    l.num_scale_groups = ceil_div(p.hidden, kScaleGroupElems);
    l.msg_scale_offset = kLlHeaderBytes + 2 * static_cast<size_t>(p.hidden);
    // Whole 128-byte lines: a message slot then starts on a line in every rank's buffer, so a warp's 512-byte
    // store of a row is four full-line NVLink writes rather than five with two partial ones.
    l.msg_bytes = align_up(l.msg_scale_offset + 4 * static_cast<size_t>(l.num_scale_groups), kLlMsgAlign);
    const size_t slots = static_cast<size_t>(p.num_ranks) * p.ll_tokens;
    size_t off = 0;
    l.persist_offset = off;
    off = align_up(off + sizeof(LlPersist), kRegionAlign);
    l.control_offset = off;
    off = align_up(off + sizeof(LlControl), kRegionAlign);
    l.ready_offset = off;
    off = align_up(off + static_cast<size_t>(l.num_local_experts) * sizeof(long long), kRegionAlign);
    l.dispatch_offset = off;
    off = align_up(off + slots * l.msg_bytes, kRegionAlign);
    l.weights_offset = off;
    off = align_up(off + slots * p.max_topk * sizeof(float), kRegionAlign);
    l.comb_recv_offset = off;
    off = align_up(off + slots * 2 * static_cast<size_t>(p.hidden), kRegionAlign);
    l.comb_buffer_offset = off;
    off = align_up(off + static_cast<size_t>(l.num_local_experts) * slots * 2 * p.hidden, kRegionAlign);
    l.total_bytes = off;
    return l;
  }

  // Rows of one expert slab: R * tokens.
  __host__ __device__ int slab_rows() const { return num_ranks * tokens; }

  // Offsets relative to the start of one LL half (BufferLayout::ll_half). RDMA needs (offset, key), so the layout
  // hands out offsets only; kernels add them to a half's base as mapped in their process.
  __host__ __device__ size_t persist() const { return persist_offset; }
  __host__ __device__ size_t control() const { return control_offset; }
  __host__ __device__ size_t expert_ready(int local_expert) const {
    return ready_offset + static_cast<size_t>(local_expert) * sizeof(long long);
  }
  __host__ __device__ size_t dispatch_msg(int src_rank, int token) const {
    return dispatch_offset + (static_cast<size_t>(src_rank) * tokens + token) * msg_bytes;
  }
  __host__ __device__ size_t combine_weights(int src_rank) const {
    return weights_offset + static_cast<size_t>(src_rank) * tokens * topk * sizeof(float);
  }
  __host__ __device__ size_t combine_recv_row(int expert_rank, int token) const {
    return comb_recv_offset + (static_cast<size_t>(expert_rank) * tokens + token) * 2 * hidden;
  }
  __host__ __device__ size_t combine_buffer() const { return comb_buffer_offset; }
  // Bytes ncclMoeLowLatencyReset zeroes, starting at control_offset.
  __host__ __device__ size_t reset_bytes() const { return comb_buffer_offset - control_offset; }
};

}  // namespace nccl_moe
