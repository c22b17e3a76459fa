#include "transport/rdma/verbs/gpu_mapping.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdio>

#include "core/error.h"

namespace nccl_moe::verbs {

namespace {

std::string runtimeDmabufFd(void* base, size_t bytes, int* fd) {
  *fd = -1;
  void* entry = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t e =
      cudaGetDriverEntryPointByVersion("cuMemGetHandleForAddressRange", &entry, 11070, cudaEnableDefault, &found);
  if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || entry == nullptr)
    return std::string("the driver has no cuMemGetHandleForAddressRange (CUDA 11.7 or newer): ") +
           cudaGetErrorString(e);
  auto get = reinterpret_cast<PFN_cuMemGetHandleForAddressRange_v11070>(entry);
  int handle = -1;
  const CUresult r = get(&handle, reinterpret_cast<CUdeviceptr>(base), bytes, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0);
  if (r != CUDA_SUCCESS) {
    char text[96];
    std::snprintf(text, sizeof(text), "cuMemGetHandleForAddressRange(DMA_BUF_FD) returned CUresult %d",
                  static_cast<int>(r));
    return text;
  }
  *fd = handle;
  return "";
}

}  // namespace

const CudaOps& CudaOps::runtime() {
  static const CudaOps ops = [] {
    CudaOps o;
    o.host_register = &cudaHostRegister;
    o.host_unregister = &cudaHostUnregister;
    o.host_get_device_pointer = &cudaHostGetDevicePointer;
    o.error_string = &cudaGetErrorString;
    o.dmabuf_fd = &runtimeDmabufFd;
    o.device_alloc = [](void** ptr, size_t bytes) { return cudaMalloc(ptr, bytes); };
    o.device_free = [](void* ptr) { return cudaFree(ptr); };
    o.copy_to_device = [](void* dst, const void* src, size_t bytes) {
      return cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
    };
    o.set_device = [](void* dst, int value, size_t bytes) { return cudaMemset(dst, value, bytes); };
    return o;
  }();
  return ops;
}

HostMapper::~HostMapper() {
  for (const Region& r : regions_) cuda_.host_unregister(reinterpret_cast<void*>(r.base));
}

ncclResult_t HostMapper::map(void* addr, size_t bytes, bool io_memory, const char* what, void** dev) {
  MOE_ARG_CHECK(addr != nullptr && bytes != 0 && dev != nullptr, "HostMapper::map(%s): null address or empty range",
                what);
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  const uintptr_t base = a / page_ * page_;
  const uintptr_t end = (a + bytes + page_ - 1) / page_ * page_;
  for (Region& r : regions_) {
    const uintptr_t r_end = r.base + r.bytes;
    if (end <= r.base || base >= r_end) continue;
    if (base < r.base || end > r_end)
      return setLastError(ncclInternalError,
                          "%s [%p, +%zu) overlaps the GPU-mapped host range [0x%lx, +%zu) only partly: CUDA cannot "
                          "register the union (page-granular registrations may not overlap)",
                          what, addr, bytes, static_cast<unsigned long>(r.base), r.bytes);
    if (r.io_memory != io_memory)
      return setLastError(ncclInternalError, "%s [%p, +%zu) lies in a page already mapped as %s memory", what, addr,
                          bytes, r.io_memory ? "I/O" : "ordinary");
    ++r.refs;
    *dev = static_cast<uint8_t*>(r.dev_base) + (a - r.base);
    return ncclSuccess;
  }
  Region r{base, static_cast<size_t>(end - base), io_memory, nullptr, 1};
  const unsigned flags =
      cudaHostRegisterMapped | cudaHostRegisterPortable | (io_memory ? cudaHostRegisterIoMemory : 0u);
  cudaError_t e = cuda_.host_register(reinterpret_cast<void*>(r.base), r.bytes, flags);
  if (e != cudaSuccess)
    return setLastError(ncclUnhandledCudaError, "cudaHostRegister(%s) failed for %s [0x%lx, +%zu): %s%s",
                        io_memory ? "Mapped|Portable|IoMemory" : "Mapped|Portable", what,
                        static_cast<unsigned long>(r.base), r.bytes, cuda_.error_string(e),
                        io_memory ? " (the driver must allow MMIO peer mapping: NVreg_EnableStreamMemOPs=1 and "
                                    "NVreg_RegistryDwords=\"PeerMappingOverride=1;\"; else use the doorbell proxy)"
                                  : "");
  e = cuda_.host_get_device_pointer(&r.dev_base, reinterpret_cast<void*>(r.base), 0);
  if (e != cudaSuccess) {
    cuda_.host_unregister(reinterpret_cast<void*>(r.base));
    return setLastError(ncclUnhandledCudaError, "cudaHostGetDevicePointer failed for %s [0x%lx, +%zu): %s", what,
                        static_cast<unsigned long>(r.base), r.bytes, cuda_.error_string(e));
  }
  regions_.push_back(r);
  *dev = static_cast<uint8_t*>(r.dev_base) + (a - r.base);
  return ncclSuccess;
}

void HostMapper::unmap(void* addr) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  for (size_t i = 0; i < regions_.size(); ++i) {
    Region& r = regions_[i];
    if (a < r.base || a >= r.base + r.bytes) continue;
    if (--r.refs == 0) {
      cuda_.host_unregister(reinterpret_cast<void*>(r.base));
      regions_.erase(regions_.begin() + static_cast<std::ptrdiff_t>(i));
    }
    return;
  }
}

}  // namespace nccl_moe::verbs
