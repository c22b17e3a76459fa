// Layout of one low-latency half (BufferLayout holds two). Owned by the low-latency kernels.
//
// Receiving rank, per local expert j and source rank s, a slab of ll_tokens messages:
//   dispatch_recv[j][s][i]: message = header (16 B) + row (hidden bytes fp8 or 2*hidden bf16) + scales
//   dispatch_count[j][s]:   epoch-tagged count written by s after its rows
//   combine_recv[e_global... ]: rows returned by expert ranks, [ll_tokens, max_topk] bf16 rows
//   combine_flag[s]:        epoch-tagged completion from s
// Sender side: send staging [ll_tokens, message] (the zero-copy combine buffer lives here too).
#pragma once

#include "mem/layout_params.h"

namespace nccl_moe {

struct LlLayout {
  int num_ranks = 0, tokens = 0, hidden = 0, topk = 0, num_local_experts = 0;
  size_t msg_bytes = 0;
  size_t dispatch_recv_offset = 0, dispatch_count_offset = 0, combine_send_offset = 0, combine_recv_offset = 0,
         combine_flag_offset = 0, total_bytes = 0;

  __host__ __device__ static LlLayout make(const LayoutParams& p) {
    LlLayout l;
    l.num_ranks = p.num_ranks;
    l.tokens = p.ll_tokens;
    l.hidden = p.hidden;
    l.topk = p.max_topk;
    l.num_local_experts = p.num_ranks > 0 ? p.num_experts / p.num_ranks : 0;
    // header + bf16 row (the widest format) + float scales
    l.msg_bytes = align_up(16 + 2 * static_cast<size_t>(p.hidden) + 4 * ceil_div(p.hidden, kScaleGroupElems), 16);
    const size_t slab_msgs = static_cast<size_t>(l.num_local_experts) * p.num_ranks * p.ll_tokens;
    size_t off = 0;
    l.dispatch_recv_offset = off;
    off = align_up(off + slab_msgs * l.msg_bytes, kRegionAlign);
    l.dispatch_count_offset = off;
    off = align_up(off + static_cast<size_t>(l.num_local_experts) * p.num_ranks * sizeof(long long), kRegionAlign);
    l.combine_send_offset = off;  // [E_l, R*tokens, hidden] bf16: zero-copy combine input
    off = align_up(off + slab_msgs * 2 * p.hidden, kRegionAlign);
    l.combine_recv_offset = off;  // [tokens, topk, hidden] bf16
    off = align_up(off + static_cast<size_t>(p.ll_tokens) * p.max_topk * 2 * p.hidden, kRegionAlign);
    l.combine_flag_offset = off;
    off = align_up(off + static_cast<size_t>(p.num_ranks) * sizeof(long long), kRegionAlign);
    l.total_bytes = off;
    return l;
  }
};

}  // namespace nccl_moe
