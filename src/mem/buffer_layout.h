// THE layout of one rank's communication buffer. The allocator (src/mem/buffer.cc), the size query
// (ncclMoeGetBufferSize) and every kernel take offsets from here and nowhere else.
//
//   [ control | high-throughput region | low-latency region (two alternating halves) ]
//
// control:  cross-rank barrier flags and sequence counters shared by all modes (ControlBlock).
// HT:       HtLayout (src/mem/ht_layout.h).
// LL:       LlLayout (src/mem/ll_layout.h), present twice for double buffering.
#pragma once

#include "mem/ht_layout.h"
#include "mem/layout_params.h"
#include "mem/ll_layout.h"

namespace nccl_moe {

// Written by peers into this rank's buffer. Counters only grow (epoch-based), so nothing is reset between
// calls and CUDA-graph replays stay valid.
struct ControlBlock {
  long long barrier_flag[kMaxRanksInLayout];  // barrier_flag[s]: barrier epochs rank s has reached here
  long long local_epoch[4];                   // this rank's own monotonic call counters (not written by peers)
};

struct BufferLayout {
  size_t control_offset;
  size_t ht_offset;
  size_t ht_bytes;
  size_t ll_offset;
  size_t ll_half_bytes;   // one of the two LL halves
  size_t total_bytes;
  HtLayout ht;
  LlLayout ll;

  __host__ __device__ static BufferLayout make(const LayoutParams& p) {
    BufferLayout b{};
    b.control_offset = 0;
    b.ht = HtLayout::make(p);
    b.ll = LlLayout::make(p);
    b.ht_offset = align_up(sizeof(ControlBlock), kRegionAlign);
    b.ht_bytes = p.ht_tokens > 0 ? align_up(b.ht.total_bytes, kRegionAlign) : 0;
    b.ll_offset = b.ht_offset + b.ht_bytes;
    b.ll_half_bytes = p.ll_tokens > 0 ? align_up(b.ll.total_bytes, kRegionAlign) : 0;
    b.total_bytes = b.ll_offset + 2 * b.ll_half_bytes;
    return b;
  }

  __host__ __device__ ControlBlock* control(uint8_t* base) const {
    return reinterpret_cast<ControlBlock*>(base + control_offset);
  }
  __host__ __device__ uint8_t* ht_region(uint8_t* base) const { return base + ht_offset; }
  __host__ __device__ uint8_t* ll_region(uint8_t* base, int half) const {
    return base + ll_offset + static_cast<size_t>(half) * ll_half_bytes;
  }
};

}  // namespace nccl_moe
