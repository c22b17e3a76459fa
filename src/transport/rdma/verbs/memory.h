// Registration of GPU memory with the verbs device: one MemoryRegion per window, producing the project's window
// record (rdma::Window: iova = the virtual address, lkey, rkey, rights, flags) that connection records and the
// GPU views carry.
//
// Contract
//   - dma-buf first: when the loader bound ibv_reg_dmabuf_mr (rdma-core 34+) and CudaOps gives a dma-buf fd for the
//     page-aligned range around the buffer (cuMemGetHandleForAddressRange), the MR is ibv_reg_dmabuf_mr(pd,
//     offset into the fd, bytes, iova = addr, fd, access); the fd is closed right after. If any step fails, the
//     reason is logged at INFO and the buffer is registered with ibv_reg_mr (ibv_reg_mr_iova2 when the access
//     has relaxed ordering), which needs the peer-memory kernel module (nvidia-peermem) for GPU memory. When both
//     fail, the message names both attempts. `force_peer_memory` skips dma-buf (bring-up: compare the paths).
//   - Access: the rights asked (WindowAccess bits), plus IBV_ACCESS_RELAXED_ORDERING for data windows when
//     `relaxed_ordering` is set (it is an optional flag: a device without it ignores it). A signal window
//     (rdma::kWindowSignal) is NEVER registered relaxed, even when the caller asks: the NIC must not let a signal
//     overtake the data before it (design notes §2.1). registrationAccess() is that rule alone.
//   - The path taken and the flags are logged at INFO (bring-up checklist items 5 and 6).
//   - Destruction deregisters (ibv_dereg_mr); a failure there is logged (WARN), never thrown.
#pragma once

#include <infiniband/verbs.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>

#include "transport/rdma/verbs/device.h"
#include "transport/rdma/window.h"

namespace nccl_moe::verbs {

enum class RegistrationPath { kDmaBuf, kPeerMemory };
const char* registrationPathName(RegistrationPath path);  // "dma-buf", "peer memory (ibv_reg_mr)"

struct RegistrationSpec {
  void* addr = nullptr;  // device memory (or host memory: then the dma-buf attempt fails and ibv_reg_mr registers)
  uint64_t bytes = 0;
  uint32_t access = rdma::kAccessAllRemote;  // rdma::WindowAccess bits
  uint32_t flags = 0;                        // rdma::WindowFlags bits (kWindowSignal)
  bool relaxed_ordering = true;              // data windows only
  bool force_peer_memory = false;
  const char* what = "window";  // for messages
};

// The ibv_access_flags a window is registered with (see the contract).
unsigned registrationAccess(uint32_t access, uint32_t flags, bool relaxed_ordering);

class MemoryRegion {
 public:
  static ncclResult_t create(Device& device, const RegistrationSpec& spec, std::unique_ptr<MemoryRegion>* out);
  ~MemoryRegion();
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  const rdma::Window& window() const { return window_; }
  RegistrationPath path() const { return path_; }
  rdma::ConnWindow connWindow() const { return {window_.addr, window_.bytes, window_.rkey}; }

 private:
  MemoryRegion(Device& device) : device_(device) {}
  Device& device_;
  ibv_mr* mr_ = nullptr;
  rdma::Window window_{};
  RegistrationPath path_ = RegistrationPath::kPeerMemory;
};

}  // namespace nccl_moe::verbs
