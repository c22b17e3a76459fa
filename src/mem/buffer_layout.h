// THE layout of one rank's communication buffer. The allocator (ncclMoeCommInit, src/core/comm.cc), the size
// query (ncclMoeGetBufferSize) and every kernel take offsets from here and nowhere else.
//
//   [ high-throughput region | low-latency region (two alternating halves) | internode LL region (two halves)
//     | internode HT region ]
//
// HT:       HtLayout (src/mem/ht_layout.h); its own sync words (epochs, arrivals) start the region.
// LL:       LlLayout (src/mem/ll_layout.h), present twice for double buffering; each half has its own control
//           block. Each mode keeps its signals inside its region, so the two never share a counter.
// LL net:   LlNetLayout (src/mem/ll_net_layout.h), two halves, only on communicators of several nodes (the
//           internode LL kernels; they also use the LL halves' zero-copy combine buffers).
// HT net:   HtNetLayout (src/mem/ht_net_layout.h), only on communicators of several nodes with HT capacity: the
//           RDMA windows of the internode HT kernels (design: docs/kernels-ht-internode.md). It comes last, so no
//           earlier offset depends on it; on one node it is empty and total_bytes is what it always was.
#pragma once

#include "mem/ht_layout.h"
#include "mem/ht_net_layout.h"
#include "mem/layout_params.h"
#include "mem/ll_layout.h"
#include "mem/ll_net_layout.h"

namespace nccl_moe {

struct BufferLayout {
  size_t ht_offset;
  size_t ht_bytes;
  size_t ll_offset;
  size_t ll_half_bytes;  // one of the two LL halves
  size_t ll_net_offset;
  size_t ll_net_half_bytes;  // one of the two internode LL halves (0: single node)
  size_t ht_net_offset;
  size_t ht_net_bytes;  // the internode HT region (0: single node or no HT capacity)
  size_t total_bytes;
  HtLayout ht;
  LlLayout ll;
  LlNetLayout ll_net;
  HtNetLayout ht_net;

  __host__ __device__ static BufferLayout make(const LayoutParams& p) {
    BufferLayout b{};
    b.ht = HtLayout::make(p);
    b.ll = LlLayout::make(p);
    b.ht_offset = 0;
    b.ht_bytes = p.ht_tokens > 0 ? align_up(b.ht.total_bytes, kRegionAlign) : 0;
    b.ll_offset = b.ht_offset + b.ht_bytes;
    b.ll_half_bytes = p.ll_tokens > 0 ? align_up(b.ll.total_bytes, kRegionAlign) : 0;
    b.ll_net = LlNetLayout::make(p);
    b.ll_net_offset = b.ll_offset + 2 * b.ll_half_bytes;
    b.ll_net_half_bytes = align_up(b.ll_net.total_bytes, kRegionAlign);
    b.ht_net = HtNetLayout::make(p);
    b.ht_net_offset = b.ll_net_offset + 2 * b.ll_net_half_bytes;
    b.ht_net_bytes = align_up(b.ht_net.total_bytes, kRegionAlign);
    b.total_bytes = b.ht_net_offset + b.ht_net_bytes;
    return b;
  }

  // Offsets from the start of a rank's buffer (the layout hands out offsets only).
  __host__ __device__ size_t ht_region() const { return ht_offset; }
  __host__ __device__ size_t ll_half(int half) const { return ll_offset + static_cast<size_t>(half) * ll_half_bytes; }
  __host__ __device__ size_t ll_net_half(int half) const {
    return ll_net_offset + static_cast<size_t>(half) * ll_net_half_bytes;
  }
  __host__ __device__ size_t ht_net_region() const { return ht_net_offset; }
};

}  // namespace nccl_moe
