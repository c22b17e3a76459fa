// Layout of one half of the low-latency region of a multi-node communicator (the "LL net" region: BufferLayout
// holds two halves, used alternately like the intranode LL halves). Owned by the internode LL kernels
// (src/kernels/low_latency_net/); the ONE definition of their offsets, used by the allocator and the kernels.
// Present only when the communicator spans several nodes; single-node buffers are unchanged.
//
// Every region a peer writes is reached by offset from the half's base: through NVLink pointers for ranks of this
// node, as (remote_base + offset, rkey) of the peer's window for ranks of other nodes. Regions of rank d's half:
//
//   control   LlNetControl: this rank's epochs and last-block counters (never written by peers)
//   persist   LlNetPersist: the reset barrier's counters (never zeroed; only half 0's copy is used)
//   signals   [kLlNetSignalKinds][R] uint64 words, [kind][s] written ONLY by rank s (an RDMA fetch-add from s's QP,
//             or an atomic add over NVLink): one writer per word, so a NIC's read-modify-write never races a
//             GPU atomic. disp_count[s] is an 8-byte WRITE ((tag << 32) | messages) that precedes
//             disp_signal[s] on the same QP.
//   count_stage [R] uint64: this rank's (tag << 32) | n_d, the source of its count WRITE to d
//   flag_stage  [R] uint64: this rank's weight flag of the current combine, the source of its WRITE to d
//   plan      [tokens][topk] int: position of token t in the message list of slot k's rank (-1: unused slot),
//             then [R] int: the number of messages to each rank
//   send      [tokens] messages: this rank's tokens as sent, the source of every RDMA WRITE of the dispatch
//   wstage    [tokens * topk] float: this rank's combine weights, the source of their WRITE
//   dispatch  [R src][tokens] messages: source s's messages to this rank, packed (message i = the i-th of s's
//             tokens with a slot here, ascending); count in disp_count[s]
//   weights   [R src][tokens * topk] float: source s's combine weights (when the combine was given weights)
//   cstage    [R src][tokens][hidden] bf16: partial sums this rank returns to source s, the source of the WRITE
//   comb_recv [R expert rank][tokens][hidden] bf16: partial sum of this rank's token t from expert rank d
//
// Message: LlNetHeader (128 B) | payload (2H bf16 bytes, or H fp8 bytes then G float scales) -- what a WRITE
// carries is msg_used_bytes(use_fp8), the slot stride msg_bytes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "device/limits.h"
#include "mem/layout_params.h"

namespace nccl_moe {

// Signal kinds (rows of the signals region).
enum LlNetSignal : int {
  kNetDispCount = 0,     // WRITE: (tag << 32) | number of messages s sent here in dispatch `tag`
  kNetDispSignal = 1,    // fetch-add 1 per dispatch of this half, after the messages and the count
  kNetDispAck = 2,       // +1 per dispatch: s finished reading the messages this rank sent it
  kNetWeightFlag = 3,    // WRITE: (tag << 32) | 1 when s's combine `tag` was given weights (then in weights[s])
  kNetWeightSignal = 4,  // +1 per combine, after s's weights (if any) and the flag
  kNetCombSignal = 5,    // +1 per combine: every partial s computed for this rank's tokens is in comb_recv[s]
  kNetCombAck = 6,       // +1 per combine: s finished reading the partials this rank returned to it
  kNetBarrier = 7,       // reset barrier arrivals from s (half 0 only; never zeroed by a reset)
  kLlNetSignalKinds = 8,
};

// Token header of an internode LL message: the token's global expert ids (int16, -1 unused) and weights, so the
// same bytes serve every destination (the receiver selects its own slots).
struct LlNetHeader {
  uint32_t tag;   // dispatch tag (diagnostics: receivers trust the count signal, not the header)
  int32_t token;  // source token index
  int32_t topk;
  int32_t pad;
  int16_t expert[kMaxTopk];
  float weight[kMaxTopk];  // topk_weights[t, k] when the dispatch was given weights
  uint8_t pad2[128 - 16 - 2 * kMaxTopk - 4 * kMaxTopk];
};
static_assert(sizeof(LlNetHeader) == 128, "net header size");

struct LlNetControl {
  long long dispatch_epoch;  // dispatches received on this half; the next one's tag is dispatch_epoch + 1
  long long combine_epoch;   // combines received on this half
  int send_done;             // last-block counters of the kernels (back to 0 after each launch)
  int recv_done;
  int comb_send_done;
  int comb_recv_done;
};

struct LlNetPersist {
  long long barrier_passes;  // reset barriers this rank has passed
};

struct LlNetLayout {
  int num_ranks = 0, tokens = 0, hidden = 0, topk = 0;
  size_t msg_bytes = 0;
  size_t control_offset = 0, persist_offset = 0, signals_offset = 0, count_stage_offset = 0, flag_stage_offset = 0,
         plan_offset = 0, send_offset = 0, wstage_offset = 0, dispatch_offset = 0, weights_offset = 0,
         cstage_offset = 0, comb_recv_offset = 0, total_bytes = 0;

  __host__ __device__ static LlNetLayout make(const LayoutParams& p) {
    LlNetLayout l;
    if (p.num_nodes <= 1 || p.ll_tokens <= 0) return l;
    const size_t R = static_cast<size_t>(p.num_ranks), T = static_cast<size_t>(p.ll_tokens),
                 H = static_cast<size_t>(p.hidden), K = static_cast<size_t>(p.max_topk);
    l.num_ranks = p.num_ranks;
    l.tokens = p.ll_tokens;
    l.hidden = p.hidden;
    l.topk = p.max_topk;
    l.msg_bytes = align_up(sizeof(LlNetHeader) + 2 * H, 128);  // bf16 is the larger payload (fp8: H + 4 H / 128)
    size_t off = 0;
    const auto region = [&off](size_t bytes) {
      const size_t at = off;
      off = align_up(off + bytes, kRegionAlign);
      return at;
    };
    l.control_offset = region(sizeof(LlNetControl));
    l.persist_offset = region(sizeof(LlNetPersist));
    l.signals_offset = region(kLlNetSignalKinds * R * sizeof(uint64_t));
    l.count_stage_offset = region(R * sizeof(uint64_t));
    l.flag_stage_offset = region(R * sizeof(uint64_t));
    l.plan_offset = region((T * K + R) * sizeof(int));
    l.send_offset = region(T * l.msg_bytes);
    l.wstage_offset = region(T * K * sizeof(float));
    l.dispatch_offset = region(R * T * l.msg_bytes);
    l.weights_offset = region(R * T * K * sizeof(float));
    l.cstage_offset = region(R * T * 2 * H);
    l.comb_recv_offset = region(R * T * 2 * H);
    l.total_bytes = off;
    return l;
  }

  // Bytes a dispatch WRITE of one message carries: header, payload and (fp8) scales, rounded up to whole 16-byte
  // vectors (the NVLink path copies in 16-byte units; the slot has room: msg_bytes >= header + 2H).
  __host__ __device__ size_t msg_used_bytes(bool fp8) const {
    const size_t H = static_cast<size_t>(hidden);
    return align_up(
        sizeof(LlNetHeader) + (fp8 ? H + 4 * static_cast<size_t>(ceil_div(hidden, kScaleGroupElems)) : 2 * H), 16);
  }
  // Offsets relative to the start of one net half.
  __host__ __device__ size_t control() const { return control_offset; }
  __host__ __device__ size_t persist() const { return persist_offset; }
  __host__ __device__ size_t signal(int kind, int src) const {
    return signals_offset + (static_cast<size_t>(kind) * num_ranks + src) * sizeof(uint64_t);
  }
  __host__ __device__ size_t count_stage(int dst) const { return count_stage_offset + dst * sizeof(uint64_t); }
  __host__ __device__ size_t flag_stage(int dst) const { return flag_stage_offset + dst * sizeof(uint64_t); }
  __host__ __device__ size_t plan() const { return plan_offset; }
  __host__ __device__ size_t send_msg(int token) const { return send_offset + static_cast<size_t>(token) * msg_bytes; }
  __host__ __device__ size_t wstage() const { return wstage_offset; }
  __host__ __device__ size_t dispatch_msg(int src, int i) const {
    return dispatch_offset + (static_cast<size_t>(src) * tokens + i) * msg_bytes;
  }
  __host__ __device__ size_t weights(int src) const {
    return weights_offset + static_cast<size_t>(src) * tokens * topk * sizeof(float);
  }
  __host__ __device__ size_t cstage_row(int src, int token) const {
    return cstage_offset + (static_cast<size_t>(src) * tokens + token) * 2 * hidden;
  }
  __host__ __device__ size_t comb_recv_row(int expert_rank, int token) const {
    return comb_recv_offset + (static_cast<size_t>(expert_rank) * tokens + token) * 2 * hidden;
  }
  // What ncclMoeLowLatencyReset zeroes: [control, persist) and [signals, signals end) of both halves (the persist
  // block and the half-0 barrier row survive: the barrier itself runs on them).
  __host__ __device__ size_t signals_bytes() const {
    return static_cast<size_t>(kNetBarrier) * num_ranks * sizeof(uint64_t);
  }
};

}  // namespace nccl_moe
