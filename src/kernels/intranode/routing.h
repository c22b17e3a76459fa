// High-throughput routing state kept in a handle (device arrays sized from the communicator's config).
// Owned by the intranode kernels; allocated by htRoutingAlloc (src/core/ops.h).
#pragma once

namespace nccl_moe {

struct HtRouting {
  bool valid = false;          // a notify has filled it
  int num_tokens = 0;          // T of the notify
  int topk = 0;
  int recv_capacity = 0;       // 0 = host-count mode
  int num_recv_tokens = -1;    // host copy (host-count mode), -1 if unknown on the host
  // device arrays
  int* recv_count = nullptr;              // [1]
  int* recv_count_per_expert = nullptr;   // [E_l]
  int* recv_src_info = nullptr;           // [R * max_tokens]
};

}  // namespace nccl_moe
