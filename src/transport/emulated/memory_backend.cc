#include "transport/emulated/memory_backend.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "transport/rdma/mlx5/byte_order.h"

namespace nccl_moe::emulated {

namespace {
uint8_t* ptr(uint64_t addr) { return reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(addr)); }
}  // namespace

void* HostMemoryBackend::allocStaging(uint64_t bytes) { return std::malloc(bytes == 0 ? 1 : bytes); }

void HostMemoryBackend::freeStaging(void* staging) { std::free(staging); }

void HostMemoryBackend::readSource(uint32_t, void* staging, uint64_t src, uint64_t bytes) {
  std::memcpy(staging, ptr(src), bytes);
}

void HostMemoryBackend::stageInline(uint32_t, void* staging, const void* bytes_in_wqe, uint64_t bytes) {
  std::memcpy(staging, bytes_in_wqe, bytes);
}

void HostMemoryBackend::writeRemote(uint32_t, int, uint64_t dst, const void* staging, uint64_t bytes) {
  std::memcpy(ptr(dst), staging, bytes);
}

void HostMemoryBackend::atomic(uint32_t, int, const AtomicRequest& request) {
  // Sequentially consistent read-modify-write: everything this thread stored before (the data of earlier WRITEs)
  // is visible to an observer that reads the new value with acquire.
  uint64_t* target = reinterpret_cast<uint64_t*>(ptr(request.remote_addr));
  uint64_t previous;
  if (request.kind == AtomicRequest::Kind::kFetchAdd) {
    previous = __atomic_fetch_add(target, request.add_or_swap, __ATOMIC_SEQ_CST);
  } else {
    previous = request.compare;
    __atomic_compare_exchange_n(target, &previous, request.add_or_swap, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  }
  if (request.result_big_endian) previous = mlx5::byte_swap64(previous);
  std::memcpy(ptr(request.result_addr), &previous, sizeof(previous));
}

void HostMemoryBackend::complete(uint32_t) { std::atomic_thread_fence(std::memory_order_seq_cst); }

}  // namespace nccl_moe::emulated
