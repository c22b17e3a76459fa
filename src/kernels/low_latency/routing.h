// Low-latency routing state kept in a handle. Owned by the low-latency kernels; allocated by llRoutingAlloc.
#pragma once

namespace nccl_moe {

struct LlRouting {
  bool valid = false;
  int half = 0;                // which LL buffer half the dispatch used
  int num_tokens = 0;
  int topk = 0;
  int hidden = 0;
  int* recv_src_info = nullptr;  // [E_l, R * ll_max_tokens]: (rank << 24) | token per received row
};

}  // namespace nccl_moe
