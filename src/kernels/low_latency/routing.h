// Low-latency routing state kept in a handle. Owned by the low-latency kernels; allocated by llRoutingAlloc
// (src/kernels/low_latency/reset.cu), filled by the dispatch's receive half, read by the combine.
#pragma once

namespace nccl_moe {

struct LlRouting {
  bool valid = false;                 // a dispatch (at least its send half) has been issued with this handle
  bool recv_pending = false;          // a dispatch send half was issued and its receive half not yet
  bool combine_recv_pending = false;  // likewise for the combine
  int half = 0;                       // which LL buffer half the dispatch used
  int num_tokens = 0;
  int topk = 0;
  int hidden = 0;
  int use_fp8 = 0;
  int scale_format = 0;
  int idx_int32 = 0;  // topk_idx type of the dispatch (the combine's topk_idx has the same type)
  bool dispatch_weights = false;  // the dispatch carried topk_weights in its message headers
  // Device arrays:
  int* recv_src_info = nullptr;  // [E_l, R * ll_max_tokens]: (rank << 24) | token per received row
  int* recv_row = nullptr;       // [R, ll_max_tokens, max_topk]: row inside slab (local expert of slot k)
                                 // where token t of rank s landed; only valid for slots sent here
};

}  // namespace nccl_moe
