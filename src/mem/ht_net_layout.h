// Layout of the internode high-throughput region (the "HT net" region) of a multi-node communicator: the RDMA
// windows of the internode HT kernels (src/kernels/ht_net/; design: docs/kernels-ht-internode.md). The ONE definition
// of their offsets, used by the allocator (through BufferLayout) and the kernels. Present only when the communicator
// spans several nodes and has HT capacity; single-node buffers are unchanged.
//
// Rows move over RDMA only between RAIL PEERS: rank (node a, local index i) talks to (node m, local index i) of every
// other node m. So every per-peer array of the data path has N - 1 entries, one per other node, indexed by the
// peer's NODE SLOT: slot(node m, seen from node a) = m < a ? m : m - 1 (peer_slot()). The NVLink leg (forwarding
// inside a node) uses the intranode HT region (src/mem/ht_layout.h), which a multi-node communicator sizes for all
// R source ranks. Notify is small and goes straight to every rank (one record per rank pair; RDMA WRITE for ranks of
// other nodes, NVLink stores for ranks of this node), so it has per-RANK arrays.
//
// Regions of rank r (N nodes, R ranks, C = max_tokens_per_rank, slot j = one other node):
//   control       HtNetControl: this rank's call counts and last-block counter (never written by peers)
//   counters      [kHtNetCounterKinds][N - 1] int64: this rank's own bookkeeping per rail peer (records / partials
//                 consumed by earlier calls: the base a cumulative tail is compared against; the chunks of the
//                 running call already posted: the order of its tail adds)
//   signals       [kHtNetSignalKinds][N - 1] uint64 words; [kind][j] written ONLY by the rail peer on slot j's node
//                 (fetch-adds on that peer's QP): one writer per word
//   notify words  [2][R] uint64: [0][s] +1 by rank s after its notify record to r; [1][d] +1 by rank d once it read
//                 r's record (r's notify_stage[d] may be rewritten). One writer per word.
//   notify_stage  [R] HtNetNotifyRecord: r's counts for rank d, the source of the WRITE (or NVLink copy) to d
//   notify_recv   [R] HtNetNotifyRecord: the counts rank s sent r
//   send          [N - 1][C] records: dispatch -- r's tokens for slot j's node, staged in node order (record q = the
//                 q-th of its tokens with a holder there), the source of the WRITE; combine -- the BF16 partials
//                 (+ weights) that node's forwarder returns for the same q
//   recv          [N - 1][C] records: dispatch -- the records of the rail peer on slot j's node, record q at q;
//                 combine -- r's BF16 partials for that peer's tokens, the source of the WRITE back
// Records of one slot are packed at THIS CALL's record stride (dispatch_record_bytes / combine_record_bytes), so n
// records are one contiguous WRITE of n * stride bytes; the slot has room for C records at the largest stride.
//
// Dispatch record: HtNetHeader | weights: float per slot (K) | ids: int16 global expert id per slot (K, -1 unused)
//                  | pad to 16 | payload: bf16 row (2H) or fp8 row (H) then the caller's scale words (float G or
//                  packed UE8M0 P), padded to 16.
// Combine record:  bf16 node partial (2H) | float weight sums (K, only when the combine has weights), padded to 16.
#pragma once

#include <cstddef>
#include <cstdint>

#include "device/limits.h"
#include "mem/layout_params.h"

namespace nccl_moe {

// Signal kinds (rows of the signals region); word [kind][j] of rank r is written only by r's rail peer on slot j.
enum HtNetSignal : int {
  kHtNetDispTail = 0,  // +n per dispatch chunk WRITE, after its n records (cumulative over calls; chunks in order)
  kHtNetDispAck = 1,   // +1 per dispatch: the peer read every record this rank sent it in that dispatch
  kHtNetCombTail = 2,  // +n per combine chunk WRITE, after its n partials (cumulative over calls; chunks in order)
  kHtNetCombAck = 3,   // +1 per combine: the peer read every partial this rank returned to it
  kHtNetSignalKinds = 4,
};

// Per-rank notify words (rows of the notify words region).
enum HtNetNotifyWord : int {
  kHtNetNotifySignal = 0,  // [s]: +1 per notify, by rank s, after its record landed in notify_recv[s]
  kHtNetNotifyAck = 1,     // [d]: +1 per notify, by rank d, once it read this rank's record (notify_stage[d] free)
  kHtNetNotifyWords = 2,
};

// Own bookkeeping words per rail peer (rows of the counters region).
enum HtNetCounter : int {
  kHtNetDispBase = 0,    // dispatch records received from slot j in earlier calls (the tail's base)
  kHtNetCombBase = 1,    // combine partials received from slot j in earlier calls
  kHtNetDispPosted = 2,  // (tag << 32) | chunks of slot j posted by dispatch `tag` (the posting order of its chunks;
                         // bit 31 set: a chunk could not be staged, no later chunk of that call is posted)
  kHtNetCombPosted = 3,  // the same for the partials a combine returns to slot j
  kHtNetCounterKinds = 4,
};

// Head of a dispatch record. pos[j]: the token's row position at rank (destination node, local index j), that is
// send_pos[s][t][that rank] of docs/reference.md, or -1 when that rank holds none of its experts. The forwarder
// reads only this to place the row; the ids and weights after the header are the token's global ones.
struct HtNetHeader {
  int32_t src_token;          // t: index of the token on its source rank
  uint32_t tag;               // dispatch tag (diagnostics: receivers trust the tail signal, not the header)
  int32_t pos[kMaxNvlPeers];  // [local index on the destination node] row position, -1 = not a holder
};
static_assert(sizeof(HtNetHeader) == 40, "HT net header size");

// What rank s tells rank d in notify (variable length: expert_count has d's local experts).
struct HtNetNotifyRecord {
  int32_t tag;          // notify tag (diagnostics and a consistency check)
  int32_t num_tokens;   // tokens of s sent to d
  int32_t num_records;  // d a rail peer of s on another node: tokens of s with a holder on d's node (the
                        // dispatch records d will forward); 0 otherwise
  int32_t reserved;
  int32_t expert_count[1];  // [E_l] (token, slot) pairs of s naming each of d's local experts, then
                            // [num_tokens] the tokens of s sent to d, ascending (d's recv_src_info); a WRITE carries
                            // only the used part (notify_record_used)
};

// This rank's counts of internode HT calls (each kind counts calls of that kind; the next one's tag is count + 1).
struct HtNetControl {
  long long notify_count;
  long long dispatch_count;  // fresh and cached dispatches
  long long combine_count;
  int blocks_done;  // last-block counter of the running kernel (back to 0 after each launch)
  int ticket;       // next chunk ticket of the running send / reduce kernel (back to 0 by its last block)
};
static_assert(sizeof(HtNetControl) == 32, "HT net control size");

struct HtNetLayout {
  int num_nodes = 0, num_slots = 0, num_ranks = 0, ranks_per_node = 0, capacity = 0, hidden = 0, topk = 0,
      num_scale_words = 0, num_local_experts = 0;
  size_t notify_record_bytes = 0, record_bytes = 0;  // record_bytes: the largest stride (slot size = C of it)
  size_t control_offset = 0, counters_offset = 0, signals_offset = 0, notify_words_offset = 0, notify_stage_offset = 0,
         notify_recv_offset = 0, send_offset = 0, recv_offset = 0, total_bytes = 0;

  // Bytes of the header, ids and weights of a dispatch record with K slots (payload starts there).
  __host__ __device__ static size_t header_bytes(int topk) {
    return align_up(sizeof(HtNetHeader) + static_cast<size_t>(topk) * (sizeof(int16_t) + sizeof(float)), 16);
  }

  __host__ __device__ static HtNetLayout make(const LayoutParams& p) {
    HtNetLayout l;
    if (p.num_nodes <= 1 || p.ht_tokens <= 0) return l;
    const size_t S = static_cast<size_t>(p.num_nodes - 1), C = static_cast<size_t>(p.ht_tokens),
                 H = static_cast<size_t>(p.hidden);
    l.num_nodes = p.num_nodes;
    l.num_slots = p.num_nodes - 1;
    l.num_ranks = p.num_ranks;
    l.ranks_per_node = ceil_div(p.num_ranks, p.num_nodes);  // the largest node (the kernels require equal nodes)
    l.capacity = p.ht_tokens;
    l.hidden = p.hidden;
    l.topk = p.max_topk;
    l.num_scale_words = ceil_div(p.hidden, kScaleGroupElems);  // float scales; packed UE8M0 words are fewer
    const size_t R = static_cast<size_t>(p.num_ranks);
    l.num_local_experts = p.num_experts / p.num_ranks;
    l.notify_record_bytes = l.notify_record_used(p.ht_tokens);
    // bf16 is the larger payload (fp8: H + 4 G <= 2 H), and a combine record (2 H + 4 K) fits in the same slot.
    l.record_bytes = header_bytes(p.max_topk) + align_up(2 * H, 16);
    size_t off = 0;
    const auto region = [&off](size_t bytes) {
      const size_t at = off;
      off = align_up(off + bytes, kRegionAlign);
      return at;
    };
    l.control_offset = region(sizeof(HtNetControl));
    l.counters_offset = region(kHtNetCounterKinds * S * sizeof(int64_t));
    l.signals_offset = region(kHtNetSignalKinds * S * sizeof(uint64_t));
    l.notify_words_offset = region(kHtNetNotifyWords * R * sizeof(uint64_t));
    l.notify_stage_offset = region(R * l.notify_record_bytes);
    l.notify_recv_offset = region(R * l.notify_record_bytes);
    l.send_offset = region(S * C * l.record_bytes);
    l.recv_offset = region(S * C * l.record_bytes);
    l.total_bytes = off;
    return l;
  }

  // Bytes of a notify record that lists `num_tokens` tokens (what its WRITE carries), and where the list starts.
  __host__ __device__ size_t notify_record_used(int num_tokens) const {
    return align_up(offsetof(HtNetNotifyRecord, expert_count) + 4 * static_cast<size_t>(num_local_experts + num_tokens),
                    16);
  }
  __host__ __device__ int notify_token_word() const { return num_local_experts; }  // index into expert_count[]

  // Slot of node `node` in the per-peer arrays of a rank on node `own_node` (node != own_node).
  __host__ __device__ static int peer_slot(int node, int own_node) { return node < own_node ? node : node - 1; }
  // The node of slot `slot` as seen from `own_node` (the inverse of peer_slot).
  __host__ __device__ static int slot_node(int slot, int own_node) { return slot < own_node ? slot : slot + 1; }

  // Stride of this call's dispatch records: header, K ids and weights, then the payload (fp8: H bytes and the
  // scale words; bf16: 2 H bytes), rounded to 16 bytes. What a WRITE of n records carries is n times this.
  __host__ __device__ static size_t dispatch_record_bytes(int hidden, int topk, bool fp8, int scale_words) {
    const size_t H = static_cast<size_t>(hidden);
    return header_bytes(topk) + align_up(fp8 ? H + 4 * static_cast<size_t>(scale_words) : 2 * H, 16);
  }
  // Stride of this call's combine records: the bf16 partial and, when the combine has weights, K float sums.
  __host__ __device__ static size_t combine_record_bytes(int hidden, int topk, bool weights) {
    return align_up(2 * static_cast<size_t>(hidden) + (weights ? 4 * static_cast<size_t>(topk) : 0), 16);
  }

  // Offsets relative to the start of the HT net region.
  __host__ __device__ size_t control() const { return control_offset; }
  __host__ __device__ size_t counter(int kind, int slot) const {
    return counters_offset + (static_cast<size_t>(kind) * num_slots + slot) * sizeof(int64_t);
  }
  __host__ __device__ size_t signal(int kind, int slot) const {
    return signals_offset + (static_cast<size_t>(kind) * num_slots + slot) * sizeof(uint64_t);
  }
  __host__ __device__ size_t notify_word(int kind, int rank) const {
    return notify_words_offset + (static_cast<size_t>(kind) * num_ranks + rank) * sizeof(uint64_t);
  }
  __host__ __device__ size_t notify_stage(int rank) const { return notify_stage_offset + rank * notify_record_bytes; }
  __host__ __device__ size_t notify_recv(int rank) const { return notify_recv_offset + rank * notify_record_bytes; }
  // Record q of slot `slot` at this call's stride (<= record_bytes).
  __host__ __device__ size_t send_record(int slot, int q, size_t stride) const {
    return send_offset + static_cast<size_t>(slot) * capacity * record_bytes + static_cast<size_t>(q) * stride;
  }
  __host__ __device__ size_t recv_record(int slot, int q, size_t stride) const {
    return recv_offset + static_cast<size_t>(slot) * capacity * record_bytes + static_cast<size_t>(q) * stride;
  }
};

}  // namespace nccl_moe
