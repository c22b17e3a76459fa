// Layout of the high-throughput region (inside BufferLayout). Owned by the intranode kernels
// (src/kernels/intranode/); this is the one definition of HT offsets, used by the allocator (through
// BufferLayout), the size query and the kernels.
//
// Region of RECEIVING rank d (R = num_ranks slots per source, capacity C = max_tokens_per_rank rows each):
//   sync:            HtSync: arrive[s] (epoch rank s has entered, written by s), this rank's own epoch
//                    counter and the finished-block counter of the running kernel (never written by peers)
//   notify[s]:       HtNotifySlot written by s during notify: count of s's tokens sent to d, per-local-expert
//                    (token, slot) counts, then an epoch flag (release)
//   src_idx[s][i]:   int32 source token index of the i-th token s sends to d (notify)
//   row_flag[s][i]:  int64 epoch flag of row i of slot s: dispatch (s -> d) and combine (s -> home d) set it
//                    to the call's epoch after the row and its metadata (release)
//   x[s][i]:         row i from s: dispatch rows (bf16 2*H bytes or fp8 H bytes, row stride = this call's row
//                    bytes) or, on a token's home rank, the combine row returned by rank s
//   meta[s][i]:      int32 words: [K local expert ids][K float weights][scale words], stride meta_stride_bytes
// Every flag only grows (epoch-tagged), so nothing is reset between calls and CUDA-graph replays stay valid.
#pragma once

#include "device/limits.h"
#include "mem/layout_params.h"

namespace nccl_moe {

// Synchronisation words at the start of every rank's HT region.
struct HtSync {
  long long arrive[kMaxNvlPeers];  // arrive[s]: epoch of the HT call rank s has entered (written by s)
  long long epoch;                 // epoch of this rank's last HT collective call (own)
  int blocks_done;                 // blocks of the running HT kernel that finished (own, reset to 0)
  int reserved;
};

// Written by source rank s into receiving rank d's notify[s].
struct HtNotifySlot {
  long long flag;  // epoch of the notify that wrote this slot (stored last, with release)
  int num_tokens;  // tokens of s sent to d
  int reserved;
  int expert_count[1];  // [E_l] (token, slot) pairs of s naming each of d's local experts (variable length)
};

struct HtLayout {
  int num_ranks = 0, capacity = 0, hidden = 0, num_scale_words = 0, topk = 0, num_local_experts = 0;
  size_t notify_slot_bytes = 0, x_slot_bytes = 0, meta_stride_bytes = 0;
  size_t sync_offset = 0, notify_offset = 0, src_idx_offset = 0, row_flag_offset = 0, x_offset = 0, meta_offset = 0,
         total_bytes = 0;

  __host__ __device__ static HtLayout make(const LayoutParams& p) {
    HtLayout l;
    l.num_ranks = p.num_ranks;
    l.capacity = p.ht_tokens;
    l.hidden = p.hidden;
    l.num_scale_words = ceil_div(p.hidden, kScaleGroupElems);  // float scales (ue8m0 packed words fit inside)
    l.topk = p.max_topk;
    l.num_local_experts = p.num_ranks > 0 ? p.num_experts / p.num_ranks : 0;
    l.notify_slot_bytes = align_up(16 + 4 * static_cast<size_t>(l.num_local_experts), 128);
    l.x_slot_bytes = align_up(static_cast<size_t>(p.ht_tokens) * 2 * p.hidden, 256);
    l.meta_stride_bytes = align_up(4 * static_cast<size_t>(2 * l.topk + l.num_scale_words), 16);
    const size_t slots = static_cast<size_t>(p.num_ranks);
    const size_t rows = slots * p.ht_tokens;
    size_t off = 0;
    l.sync_offset = off;
    off = align_up(off + sizeof(HtSync), 256);
    l.notify_offset = off;
    off = align_up(off + l.notify_slot_bytes * slots, 256);
    l.src_idx_offset = off;
    off = align_up(off + rows * 4, 256);
    l.row_flag_offset = off;
    off = align_up(off + rows * 8, kRegionAlign);
    l.x_offset = off;
    off = align_up(off + l.x_slot_bytes * slots, kRegionAlign);
    l.meta_offset = off;
    off = align_up(off + rows * l.meta_stride_bytes, kRegionAlign);
    l.total_bytes = off;
    return l;
  }

  // Offsets relative to the start of the HT region.
  __host__ __device__ size_t sync() const { return sync_offset; }
  __host__ __device__ size_t notify(int src) const { return notify_offset + notify_slot_bytes * src; }
  __host__ __device__ size_t src_idx(int src, int pos) const {
    return src_idx_offset + (static_cast<size_t>(src) * capacity + pos) * 4;
  }
  __host__ __device__ size_t row_flag(int src, int pos) const {
    return row_flag_offset + (static_cast<size_t>(src) * capacity + pos) * 8;
  }
  // row_bytes: this call's row size (<= 2 * hidden); rows of one slot are packed at that stride.
  __host__ __device__ size_t x(int src, int pos, size_t row_bytes) const {
    return x_offset + static_cast<size_t>(src) * x_slot_bytes + static_cast<size_t>(pos) * row_bytes;
  }
  __host__ __device__ size_t meta(int src, int pos) const {
    return meta_offset + (static_cast<size_t>(src) * capacity + pos) * meta_stride_bytes;
  }
};

}  // namespace nccl_moe
