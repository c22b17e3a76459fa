// Layout of the internode high-throughput region (the "HT net" region) of a multi-node communicator: the RDMA
// windows of the internode HT kernels (design: docs/kernels-ht-internode.md; the kernels do not exist yet). The ONE
// definition of their offsets, used by the allocator (through BufferLayout) and, later, the kernels. Present only
// when the communicator spans several nodes and has HT capacity; single-node buffers are unchanged.
//
// The internode HT path moves a token over RDMA only between RAIL PEERS: rank (node a, local index i) talks to
// (node m, local index i) of every other node m, nobody else. So every per-peer array below has N - 1 entries, one
// per other node, indexed by the peer's NODE SLOT: slot(node m, seen from node a) = m < a ? m : m - 1
// (peer_slot()). The NVLink leg (forwarding inside a node) uses the intranode HT region (src/mem/ht_layout.h),
// which a multi-node communicator already sizes for all R source ranks.
//
// Regions of rank r (N nodes, C = max_tokens_per_rank, slot j = one other node):
//   control      HtNetControl: this rank's call counts (never written by peers)
//   counters     [kHtNetCounterKinds][N - 1] int64: this rank's own bookkeeping per rail peer (never written by
//                peers): records / partials consumed before this call, chunk-posting order of this call
//   signals      [kHtNetSignalKinds][N - 1] uint64 words; [kind][j] written ONLY by the rail peer on slot j's
//                node (fetch-adds on that peer's QP): one writer per word
//   notify_stage [N - 1] HtNetNotifyRecord: this rank's counts for the ranks of slot j's node, the source of
//                the notify WRITE to its rail peer there
//   notify_recv  [N - 1] HtNetNotifyRecord: the counts the rail peer on slot j's node sent this rank
//   send         [N - 1][C] records: dispatch -- this rank's tokens for slot j's node, staged in node order (record
//                q = the q-th of its tokens with a holder there), the source of the chunk WRITEs; combine -- the
//                BF16 partials (+ weights) that node's forwarder returns for the same q
//   recv         [N - 1][C] records: dispatch -- the records of the rail peer on slot j's node, record q at q;
//                combine -- this rank's BF16 partials for that peer's tokens, the source of the chunk WRITEs back
// Records of one slot are packed at THIS CALL's record stride (dispatch_record_bytes / combine_record_bytes), so a
// chunk of n records is one contiguous WRITE of n * stride bytes; the slot has room for C records at the largest
// stride.
//
// Dispatch record: HtNetHeader | ids: int16 global expert id per slot (K, -1 unused) | weights: float per slot (K)
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
  kHtNetNotifySignal = 0,  // +1 per notify, after the WRITE of the peer's HtNetNotifyRecord into notify_recv[j]
  kHtNetNotifyAck = 1,     // +1 per notify: the peer forwarded the record this rank sent it (notify_stage reusable)
  kHtNetDispTail = 2,      // +n per dispatch chunk, after the chunk's n records (cumulative over calls)
  kHtNetDispAck = 3,       // +1 per dispatch: the peer read every record this rank sent it in that dispatch
  kHtNetCombTail = 4,      // +n per combine chunk, after the chunk's n partials (cumulative over calls)
  kHtNetCombAck = 5,       // +1 per combine: the peer read every partial this rank returned to it
  kHtNetSignalKinds = 6,
};

// Own bookkeeping words per rail peer (rows of the counters region).
enum HtNetCounter : int {
  kHtNetDispBase = 0,    // dispatch records received from slot j in earlier calls (the tail's base)
  kHtNetCombBase = 1,    // combine partials received from slot j in earlier calls
  kHtNetDispPosted = 2,  // (tag << 32) | dispatch chunks posted to slot j so far in call `tag` (posting order)
  kHtNetCombPosted = 3,  // the same for the combine partials
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

// Counts a rank sends its rail peer on node m in notify (variable length: expert_count has the node's experts).
struct HtNetNotifyRecord {
  int32_t tag;                       // notify tag (diagnostics)
  int32_t num_records;               // tokens of the source with a holder on node m (dispatch records to expect)
  int32_t rank_count[kMaxNvlPeers];  // [local index j] tokens of the source sent to rank (m, j)
  int32_t expert_count[1];           // [G * E_l] (token, slot) pairs naming each expert of node m, local order
};

// This rank's counts of internode HT calls (each kind counts calls of that kind; the next one's tag is count + 1).
struct HtNetControl {
  long long notify_count;
  long long dispatch_count;  // fresh and cached dispatches
  long long combine_count;
  int blocks_done;  // last-block counter of the running kernel (back to 0 after each launch)
  int reserved;
};

struct HtNetLayout {
  int num_nodes = 0, num_slots = 0, ranks_per_node = 0, capacity = 0, hidden = 0, topk = 0, num_scale_words = 0;
  size_t notify_record_bytes = 0, record_bytes = 0;  // record_bytes: the largest stride (slot size = C of it)
  size_t control_offset = 0, counters_offset = 0, signals_offset = 0, notify_stage_offset = 0, notify_recv_offset = 0,
         send_offset = 0, recv_offset = 0, total_bytes = 0;

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
    l.ranks_per_node = ceil_div(p.num_ranks, p.num_nodes);  // the largest node (the kernels require equal nodes)
    l.capacity = p.ht_tokens;
    l.hidden = p.hidden;
    l.topk = p.max_topk;
    l.num_scale_words = ceil_div(p.hidden, kScaleGroupElems);  // float scales; packed UE8M0 words are fewer
    const size_t node_experts = static_cast<size_t>(l.ranks_per_node) * (p.num_experts / p.num_ranks);
    l.notify_record_bytes = align_up(offsetof(HtNetNotifyRecord, expert_count) + 4 * node_experts, 16);
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
    l.notify_stage_offset = region(S * l.notify_record_bytes);
    l.notify_recv_offset = region(S * l.notify_record_bytes);
    l.send_offset = region(S * C * l.record_bytes);
    l.recv_offset = region(S * C * l.record_bytes);
    l.total_bytes = off;
    return l;
  }

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
  __host__ __device__ size_t notify_stage(int slot) const { return notify_stage_offset + slot * notify_record_bytes; }
  __host__ __device__ size_t notify_recv(int slot) const { return notify_recv_offset + slot * notify_record_bytes; }
  // Record q of slot `slot` at this call's stride (<= record_bytes).
  __host__ __device__ size_t send_record(int slot, int q, size_t stride) const {
    return send_offset + static_cast<size_t>(slot) * capacity * record_bytes + static_cast<size_t>(q) * stride;
  }
  __host__ __device__ size_t recv_record(int slot, int q, size_t stride) const {
    return recv_offset + static_cast<size_t>(slot) * capacity * record_bytes + static_cast<size_t>(q) * stride;
  }
};

}  // namespace nccl_moe
