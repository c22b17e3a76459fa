// What the verbs backend needs from CUDA, as a table of function pointers (so unit tests run it against fakes on a
// machine without a GPU), and the bookkeeping that makes host memory libmlx5 allocated -- send queues, CQs,
// doorbell records -- and the UAR doorbell page visible to the GPU.
//
// Contract
//   - CudaOps::runtime() is the real table: cudaHostRegister / cudaHostUnregister / cudaHostGetDevicePointer of the
//     runtime, and a dma-buf file descriptor for a device-memory range through the driver's
//     cuMemGetHandleForAddressRange(CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD), reached with
//     cudaGetDriverEntryPointByVersion (CUDA 11.7's ABI) so the library does not call the driver API by name.
//   - HostMapper registers whole pages, Mapped | Portable (| IoMemory for the UAR), once per page range: libmlx5
//     packs the doorbell records of many QPs and CQs into one page and lets QPs share a UAR page, and CUDA refuses
//     a second registration of a page. A range inside an existing registration shares it (reference count); a
//     range that overlaps one only partly is refused, naming both (it would need a registration CUDA cannot make).
//     unmap() releases one reference; the last one unregisters. The destructor unregisters what is left.
//   - Errors: ncclUnhandledCudaError with "<call> failed for <what> [addr, addr+bytes): <CUDA text>".
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace nccl_moe::verbs {

struct CudaOps {
  cudaError_t (*host_register)(void* ptr, size_t bytes, unsigned int flags) = nullptr;
  cudaError_t (*host_unregister)(void* ptr) = nullptr;
  cudaError_t (*host_get_device_pointer)(void** dev, void* host, unsigned int flags) = nullptr;
  const char* (*error_string)(cudaError_t error) = nullptr;
  // A dma-buf fd for [base, base + bytes) of device memory (both multiples of the host page size). Returns "" and
  // *fd (the caller closes it), or why there is none (driver too old, not supported, the call's error).
  std::string (*dmabuf_fd)(void* base, size_t bytes, int* fd) = nullptr;
  // Device memory the communicator transport owns (the QPs' GPU-side state, the scale-out table): cudaMalloc,
  // cudaFree, and blocking host-to-device copies / sets.
  cudaError_t (*device_alloc)(void** ptr, size_t bytes) = nullptr;
  cudaError_t (*device_free)(void* ptr) = nullptr;
  cudaError_t (*copy_to_device)(void* dst, const void* src, size_t bytes) = nullptr;
  cudaError_t (*set_device)(void* dst, int value, size_t bytes) = nullptr;

  static const CudaOps& runtime();
};

class HostMapper {
 public:
  explicit HostMapper(const CudaOps& cuda, size_t page_bytes = 4096) : cuda_(cuda), page_(page_bytes) {}
  ~HostMapper();
  HostMapper(const HostMapper&) = delete;
  HostMapper& operator=(const HostMapper&) = delete;

  // Makes [addr, addr + bytes) visible to the GPU and sets *dev to the device address of addr. `io_memory`: the
  // range is MMIO (a UAR page), registered with cudaHostRegisterIoMemory. `what` names it in messages.
  ncclResult_t map(void* addr, size_t bytes, bool io_memory, const char* what, void** dev);
  // Releases one map() of the range containing addr (no-op when none does).
  void unmap(void* addr);

  size_t numRegistrations() const { return regions_.size(); }

 private:
  struct Region {
    uintptr_t base;  // page-aligned
    size_t bytes;    // whole pages
    bool io_memory;
    void* dev_base;
    int refs;
  };
  const CudaOps& cuda_;
  size_t page_;
  std::vector<Region> regions_;
};

}  // namespace nccl_moe::verbs
