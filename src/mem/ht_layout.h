// Layout of the high-throughput region (inside BufferLayout). Owned by the intranode kernels.
//
// For every source rank s (R slots), the region of the RECEIVING rank holds:
//   notify[s]:   NotifySlot: epoch flag + the count of s's tokens for this rank + per-local-expert counts
//   x[s]:        [ht_tokens, hidden] rows of 2*hidden bytes (bf16; fp8 uses the first half)
//   scales[s]:   [ht_tokens, ceil(hidden/128)] float32 (ue8m0 packed int32 fits inside)
//   topk_idx[s]: [ht_tokens, max_topk] int32 local expert ids
//   topk_w[s]:   [ht_tokens, max_topk] float32
//   done[s]:     per-source completion counter of dispatch and combine
// Combine reuses x[d] on the token's home rank for the row returned by rank d.
#pragma once

#include "mem/layout_params.h"

namespace nccl_moe {

constexpr int kMaxRanksInLayout = 8;

struct HtLayout {
  int num_ranks = 0, capacity = 0, hidden = 0, num_scales = 0, topk = 0, num_local_experts = 0;
  size_t notify_slot_bytes = 0;
  size_t notify_offset = 0, done_offset = 0, x_offset = 0, scales_offset = 0, topk_idx_offset = 0,
         topk_w_offset = 0, total_bytes = 0;

  __host__ __device__ static HtLayout make(const LayoutParams& p) {
    HtLayout l;
    l.num_ranks = p.num_ranks;
    l.capacity = p.ht_tokens;
    l.hidden = p.hidden;
    l.num_scales = ceil_div(p.hidden, kScaleGroupElems);
    l.topk = p.max_topk;
    l.num_local_experts = p.num_ranks > 0 ? p.num_experts / p.num_ranks : 0;
    // flag (8) + count (4) + per-expert counts (4 each), rounded to 128 bytes
    l.notify_slot_bytes = align_up(16 + 4 * static_cast<size_t>(l.num_local_experts + 1), 128);
    size_t off = 0;
    l.notify_offset = off;
    off = align_up(off + l.notify_slot_bytes * kMaxRanksInLayout, 256);
    l.done_offset = off;
    off = align_up(off + 4 * sizeof(long long) * kMaxRanksInLayout, kRegionAlign);
    const size_t rows = static_cast<size_t>(p.num_ranks) * p.ht_tokens;
    l.x_offset = off;
    off = align_up(off + rows * 2 * p.hidden, kRegionAlign);
    l.scales_offset = off;
    off = align_up(off + rows * l.num_scales * 4, kRegionAlign);
    l.topk_idx_offset = off;
    off = align_up(off + rows * l.topk * 4, kRegionAlign);
    l.topk_w_offset = off;
    off = align_up(off + rows * l.topk * 4, kRegionAlign);
    l.total_bytes = off;
    return l;
  }

  __host__ __device__ size_t row_bytes() const { return 2 * static_cast<size_t>(hidden); }
  __host__ __device__ size_t notify(int src) const { return notify_offset + notify_slot_bytes * src; }
  __host__ __device__ size_t done(int src, int which) const {
    return done_offset + sizeof(long long) * (which * kMaxRanksInLayout + src);
  }
  __host__ __device__ size_t x(int src, int row) const {
    return x_offset + (static_cast<size_t>(src) * capacity + row) * row_bytes();
  }
  __host__ __device__ size_t scales(int src, int row) const {
    return scales_offset + (static_cast<size_t>(src) * capacity + row) * num_scales * 4;
  }
  __host__ __device__ size_t topk_idx(int src, int row) const {
    return topk_idx_offset + (static_cast<size_t>(src) * capacity + row) * topk * 4;
  }
  __host__ __device__ size_t topk_w(int src, int row) const {
    return topk_w_offset + (static_cast<size_t>(src) * capacity + row) * topk * 4;
  }
};

}  // namespace nccl_moe
