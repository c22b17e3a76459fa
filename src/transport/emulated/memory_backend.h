// Where the software NIC's memory operations go. The executor (nic.h) decides WHAT happens and WHEN (order,
// chunks, chaos); a backend only moves bytes. One backend serves one NIC, and all its calls come from that NIC's
// executor, one at a time.
//
//   HostMemoryBackend   requester and responder memory are host memory of this process (CPU tests): memcpy and
//                       __atomic builtins on 8-byte aligned host words; every call is complete when it returns.
//   CudaMemoryBackend   (cuda_backend.h) requester and responder memory are device memory of this process on one
//                       GPU (virtual nodes): a CUDA stream per QP, cudaMemcpyAsync, a one-thread atomic kernel
//                       (loaded at creation, design notes §4.3), complete = stream drained; staging in a fixed
//                       device arena.
//   (later) IPC         the same through the responder's IPC mapping, for ranks in other processes.
//
// Addresses are as the NIC sees them (a registration's iova; this transport registers with iova = the owner's
// virtual address); `peer` names the responder so a backend can pick its mapping of that rank's memory.
//
// Contract the executor relies on:
//   - writeRemote / atomic calls for one QP may complete in any order until complete(qp) returns; after it, every
//     operation issued for that QP is done and visible to every observer of the target memory. The executor calls
//     complete(qp) before an atomic executes (so the atomic follows the data of earlier WRITEs) and before it
//     writes a CQE (so a CQE means done).
//   - Staging memory stays valid until freeStaging; the executor frees it only after complete(qp).
#pragma once

#include <cstdint>

namespace nccl_moe::emulated {

struct AtomicRequest {
  enum class Kind : uint8_t { kFetchAdd, kCompareSwap };
  Kind kind = Kind::kFetchAdd;
  uint64_t remote_addr = 0;        // 8-byte aligned responder word
  uint64_t add_or_swap = 0;        // fetch-add: the addend; compare-swap: the value stored on a match
  uint64_t compare = 0;            // compare-swap only
  uint64_t result_addr = 0;        // requester's 8-byte buffer receiving the previous value
  bool result_big_endian = false;  // store the previous value big-endian (an HCA capability, design notes §2.1)
};

class MemoryBackend {
 public:
  virtual ~MemoryBackend() = default;
  virtual const char* name() const = 0;

  virtual void* allocStaging(uint64_t bytes) = 0;
  virtual void freeStaging(void* staging) = 0;
  // Copies `bytes` of the requester's memory at `src` into `staging` (the moment the NIC reads the source).
  virtual void readSource(uint32_t qp, void* staging, uint64_t src, uint64_t bytes) = 0;
  // Copies inline WQE bytes (executor host memory) into `staging`.
  virtual void stageInline(uint32_t qp, void* staging, const void* bytes_in_wqe, uint64_t bytes) = 0;
  // Places `bytes` from `staging` at the responder's `dst` (the moment the data lands).
  virtual void writeRemote(uint32_t qp, int peer, uint64_t dst, const void* staging, uint64_t bytes) = 0;
  // Performs the atomic on the responder's word and stores the previous value into the result buffer.
  virtual void atomic(uint32_t qp, int peer, const AtomicRequest& request) = 0;
  // Returns when every operation issued for `qp` so far is complete and visible.
  virtual void complete(uint32_t qp) = 0;
};

// Requester and responder memory in this process's address space.
class HostMemoryBackend final : public MemoryBackend {
 public:
  const char* name() const override { return "host"; }
  void* allocStaging(uint64_t bytes) override;
  void freeStaging(void* staging) override;
  void readSource(uint32_t qp, void* staging, uint64_t src, uint64_t bytes) override;
  void stageInline(uint32_t qp, void* staging, const void* bytes_in_wqe, uint64_t bytes) override;
  void writeRemote(uint32_t qp, int peer, uint64_t dst, const void* staging, uint64_t bytes) override;
  void atomic(uint32_t qp, int peer, const AtomicRequest& request) override;
  void complete(uint32_t qp) override;
};

}  // namespace nccl_moe::emulated
