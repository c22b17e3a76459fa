// High-throughput routing state kept in a handle (device arrays sized from the communicator's config).
// Owned by the intranode kernels; allocated by htRoutingAlloc, filled by the notify kernel
// (src/kernels/intranode/notify.cu), read by dispatch and combine. Everything the kernels need lives in
// device memory, so a captured notify + dispatch + combine replays with new routing.
#pragma once

namespace nccl_moe {

struct HtRouting {
  bool valid = false;          // a notify has filled it
  int num_tokens = 0;          // T of the notify
  int topk = 0;                // K of the notify
  int topk_idx_is_int64 = 1;   // index type of the notify's topk_idx (dispatch writes recv_topk_idx in it)
  int expert_alignment = 1;
  int recv_capacity = 0;       // 0 = host-count mode
  int num_recv_tokens = -1;    // host copy (host-count mode), -1 if unknown on the host
  int num_ranks = 0;
  int capacity = 0;            // max_tokens_per_rank of the communicator (array sizes below)
  int max_topk = 0;
  int num_local_experts = 0;
  // device arrays
  int* recv_count = nullptr;              // [1] N_recv
  int* recv_count_per_expert = nullptr;   // [E_l] aligned per-local-expert receive counts
  int* recv_src_info = nullptr;           // [R * capacity] (src_rank << 24) | src_token per received row
  int* send_count = nullptr;              // [R] tokens of this rank sent to each rank (own included)
  int* recv_prefix = nullptr;             // [R + 1] rows from source s are [recv_prefix[s], recv_prefix[s+1])
  int* send_list = nullptr;               // [R, capacity] send_list[d][i]: i-th token sent to d (ascending)
  int* send_pos = nullptr;                // [capacity, R] send_pos[t][d]: index of t among tokens sent to d, -1
  int* topk_idx = nullptr;                // [capacity, max_topk] int32 copy of the notify's topk_idx
  void* device_block = nullptr;           // one allocation holding all of the above
};

}  // namespace nccl_moe
