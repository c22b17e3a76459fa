// Every kernel the library may launch, loaded on a device once, at communicator init.
//
// Why: with CUDA's lazy module loading (the default since CUDA 12), the first launch of a kernel loads it, and
// loading waits for the device. Ranks whose kernels wait for each other on the device (ranks sharing a GPU in an
// ncclMoeCommInitAll world, processes under MPS, an LL call overlapped with other work) then deadlock until the
// device timeout: a rank's thread that loads a kernel waits for a peer's kernel that spins until this rank's next
// call, which the blocked thread never makes (seen: back-to-back HT calls of two ranks on one H200). The same holds
// for the CUDA runtime's own memset kernels, which the host operations use; they are loaded here too.
#include <mutex>
#include <set>

#include "core/device_guard.h"
#include "core/error.h"
#include "kernels/cast/cast.h"
#include "kernels/ht_net/args.h"
#include "kernels/intranode/args.h"
#include "kernels/layout/layout.h"
#include "kernels/low_latency/args.h"
#include "kernels/low_latency_net/args.h"
#include "ops/ops.h"

namespace nccl_moe {

ncclResult_t loadKernels(int device) {
  static std::mutex mutex;
  static std::set<int> loaded;
  std::lock_guard<std::mutex> lock(mutex);
  if (loaded.count(device) != 0) return ncclSuccess;
  const DeviceGuard guard(device);
  MOE_CUDA_CHECK(ht::loadNotifyKernels());
  MOE_CUDA_CHECK(ht::loadDispatchKernels());
  MOE_CUDA_CHECK(ht::loadCombineKernels());
  MOE_CUDA_CHECK(ht::loadEducationalKernels());
  MOE_CUDA_CHECK(loadLlDispatchKernels());
  MOE_CUDA_CHECK(loadLlCombineKernels());
  MOE_CUDA_CHECK(loadLlResetKernels());
  MOE_CUDA_CHECK(loadLlNetDispatchKernels());
  MOE_CUDA_CHECK(loadLlNetCombineKernels());
  MOE_CUDA_CHECK(loadHtNetNotifyKernels());
  MOE_CUDA_CHECK(loadHtNetDispatchKernels());
  MOE_CUDA_CHECK(loadHtNetCombineKernels());
  MOE_CUDA_CHECK(loadLayoutKernels());
  MOE_CUDA_CHECK(loadCastKernels());
  // The runtime's memset kernels (counters of the layout, the LL reset): every size class the operations use, at
  // aligned and unaligned addresses.
  void* scratch = nullptr;
  MOE_CUDA_CHECK(cudaMalloc(&scratch, 1 << 20));
  cudaError_t err = cudaSuccess;
  for (size_t bytes : {size_t{4}, size_t{64}, size_t{4096}, size_t{1} << 19}) {
    if (err == cudaSuccess) err = cudaMemset(scratch, 0, bytes);
    if (err == cudaSuccess) err = cudaMemset(static_cast<uint8_t*>(scratch) + 1, 0, bytes - 1);
  }
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  cudaFree(scratch);
  MOE_CUDA_CHECK(err);
  loaded.insert(device);
  return ncclSuccess;
}

}  // namespace nccl_moe
