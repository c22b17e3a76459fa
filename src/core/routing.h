// Routing state kept in a handle (ncclMoeHandle_t), one part per kernel family. Host objects: allocated and
// changed only by the host operations (src/ops/ht.cc, src/ops/ll.cc), read by the API's validation; kernels
// receive the device arrays through their Args.
#pragma once

namespace nccl_moe {

// High-throughput: device arrays sized from the communicator's config, filled by the notify kernel and read by
// dispatch and combine. Everything the kernels need lives in device memory, so a captured notify + dispatch +
// combine replays with new routing.
struct HtRouting {
  bool valid = false;         // a notify has filled it
  int num_tokens = 0;         // T of the notify
  int topk = 0;               // K of the notify
  int topk_idx_is_int64 = 1;  // index type of the notify's topk_idx (dispatch writes recv_topk_idx in it)
  int expert_alignment = 1;
  int recv_capacity = 0;     // 0 = host-count mode
  int num_recv_tokens = -1;  // host copy (host-count mode), -1 if unknown on the host
  int num_ranks = 0;
  int capacity = 0;  // max_tokens_per_rank of the communicator (array sizes below)
  int max_topk = 0;
  int num_local_experts = 0;
  // device arrays
  int* recv_count = nullptr;             // [1] N_recv
  int* recv_count_per_expert = nullptr;  // [E_l] aligned per-local-expert receive counts
  int* recv_src_info = nullptr;          // [R * capacity] pack_src_info(src_rank, src_token) per received row
  int* send_count = nullptr;             // [R] tokens of this rank sent to each rank (own included)
  int* recv_prefix = nullptr;            // [R + 1] rows from source s are [recv_prefix[s], recv_prefix[s+1])
  int* send_list = nullptr;              // [R, capacity] send_list[d][i]: i-th token sent to d (ascending)
  int* send_pos = nullptr;               // [capacity, R] send_pos[t][d]: index of t among tokens sent to d, -1
  int* topk_idx = nullptr;               // [capacity, max_topk] int32 copy of the notify's topk_idx
  // Several nodes only (the internode kernels, src/kernels/ht_net/args.h HtNetRouting; N nodes of G ranks):
  int* node_count = nullptr;     // [N] tokens of this rank with a holder on node m
  int* node_list = nullptr;      // [N, capacity] node_list[m][q]: the q-th of them
  int* node_pos = nullptr;       // [capacity, N] node_pos[t][m]: q of t in node_list[m], -1
  int* fwd_count = nullptr;      // [N - 1] records the rail source of node slot j sends this rank per dispatch
  int* fwd_pos = nullptr;        // [N - 1, capacity, G] row position of record q at local rank g, -1
  void* device_block = nullptr;  // one allocation holding all of the above
};

// Low-latency: filled by the dispatch's receive half, read by the combine; the phase-state flags let the API
// reject a receive half without its send half (and the reverse) before anything is enqueued.
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
  int idx_int32 = 0;              // topk_idx type of the dispatch (the combine's topk_idx has the same type)
  bool dispatch_weights = false;  // the dispatch carried topk_weights in its message headers
  // Device arrays:
  int* recv_src_info = nullptr;  // [E_l, R * ll_max_tokens]: pack_src_info(rank, token) per received row
  int* recv_row = nullptr;       // [R, ll_max_tokens, max_topk]: row inside slab (local expert of slot k)
                                 // where token t of rank s landed; only valid for slots sent here
};

}  // namespace nccl_moe
