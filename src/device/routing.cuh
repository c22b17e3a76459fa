// How kernels read routing: the top-k id decode (int32 or int64 tensors) and the source-info word of a received
// row. One definition each, used by the layout, notify and low-latency kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "device/wait.cuh"

namespace nccl_moe {
namespace dev {

// Global expert of slot i of a [T, K] top-k tensor (int32 when idx_int32, else int64), or -1 when the slot is
// unused (-1) or names no expert of the communicator (outside [0, num_experts); compared in 64 bits, so an int64
// id is never truncated into range). Every kernel that reads the caller's ids decodes them here (layout, HT notify,
// LL dispatch send and combine); an id that is neither -1 nor in [0, num_experts) is also recorded as the
// communicator's asynchronous error (kErrBadExpertId, naming the token i / topk, the slot i % topk and the id)
// before it is read as unused, so a routing bug surfaces as an error instead of a silently dropped slot.
__device__ __forceinline__ int load_topk_id_checked(const DeviceComm& comm, Phase phase, const void* topk_idx,
                                                    int idx_int32, size_t i, int topk, int num_experts) {
  const int64_t e = idx_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(topk_idx)[i])
                              : static_cast<const int64_t*>(topk_idx)[i];
  if (e >= 0 && e < num_experts) return static_cast<int>(e);
  if (e != -1)
    record_error(comm, kErrBadExpertId, phase, -1, static_cast<long long>(i / static_cast<size_t>(topk)),
                 static_cast<long long>(i % static_cast<size_t>(topk)), static_cast<long long>(e));
  return -1;
}

}  // namespace dev

// Source of a received row, as the handles keep it (ncclMoeHandleRecvCountDevice documents it): source rank in
// bits 24..31, source token in bits 0..23 (max_tokens_per_rank < 2^24, ranks < 128).
__host__ __device__ __forceinline__ int pack_src_info(int rank, int token) {
  return static_cast<int>((static_cast<unsigned>(rank) << 24) | static_cast<unsigned>(token));
}
__host__ __device__ __forceinline__ int src_info_rank(int info) {
  return static_cast<int>(static_cast<unsigned>(info) >> 24);
}
__host__ __device__ __forceinline__ int src_info_token(int info) { return info & 0xffffff; }

}  // namespace nccl_moe
