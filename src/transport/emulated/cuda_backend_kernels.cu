// The CUDA memory backend's kernels (cuda_backend.h): the NIC's atomics and inline-data staging, one thread each.
#include "transport/emulated/cuda_backend.h"
#include "transport/rdma/mlx5/byte_order.h"

namespace nccl_moe::emulated {

namespace {

struct AtomicArgs {
  unsigned long long* target;  // null: warm-up launch, does nothing
  unsigned long long* result;
  unsigned long long add_or_swap;
  unsigned long long compare;
  int compare_swap;
  int result_big_endian;
};

__global__ void emuAtomicKernel(AtomicArgs a) {
  if (a.target == nullptr) return;
  const unsigned long long old = a.compare_swap != 0 ? atomicCAS_system(a.target, a.compare, a.add_or_swap)
                                                     : atomicAdd_system(a.target, a.add_or_swap);
  if (a.result != nullptr) *a.result = a.result_big_endian != 0 ? mlx5::byte_swap64(old) : old;
  __threadfence_system();
}

__global__ void emuStageInlineKernel(uint8_t* dst, InlineBytes b, uint32_t num_bytes) {
  if (dst == nullptr) return;
  for (uint32_t i = 0; i < num_bytes; ++i) dst[i] = b.bytes[i];
}

}  // namespace

cudaError_t loadCudaBackendKernels(cudaStream_t stream) {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, emuAtomicKernel);
  if (err != cudaSuccess) return err;
  err = cudaFuncGetAttributes(&attr, emuStageInlineKernel);
  if (err != cudaSuccess) return err;
  emuAtomicKernel<<<1, 1, 0, stream>>>(AtomicArgs{});
  emuStageInlineKernel<<<1, 1, 0, stream>>>(nullptr, InlineBytes{}, 0);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return cudaStreamSynchronize(stream);
}

cudaError_t launchEmuAtomic(const AtomicRequest& r, cudaStream_t stream) {
  AtomicArgs a;
  a.target = reinterpret_cast<unsigned long long*>(r.remote_addr);
  a.result = reinterpret_cast<unsigned long long*>(r.result_addr);
  a.add_or_swap = r.add_or_swap;
  a.compare = r.compare;
  a.compare_swap = r.kind == AtomicRequest::Kind::kCompareSwap ? 1 : 0;
  a.result_big_endian = r.result_big_endian ? 1 : 0;
  emuAtomicKernel<<<1, 1, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launchEmuStageInline(void* dst, const InlineBytes& bytes, uint32_t num_bytes, cudaStream_t stream) {
  emuStageInlineKernel<<<1, 1, 0, stream>>>(static_cast<uint8_t*>(dst), bytes, num_bytes);
  return cudaGetLastError();
}

}  // namespace nccl_moe::emulated
