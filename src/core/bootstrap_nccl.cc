// The bootstrap over the user's ncclComm_t (ncclMoeCommInit): all-gathers through ncclAllGather on a
// non-blocking stream of its own, synchronised before returning. Scratch device memory is allocated once at
// creation, so an all-gather itself never allocates (a rank whose allocation failed would otherwise leave the
// others waiting in a collective it never enters).
#include <cuda_runtime.h>

#include <cstring>
#include <vector>

#include "core/bootstrap.h"
#include "core/comm.h"
#include "core/device_guard.h"
#include "core/error.h"

namespace nccl_moe {
namespace {

class NcclBootstrap : public Bootstrap {
 public:
  static constexpr size_t kChunkBytes = 4096;  // per rank and round; larger all-gathers take several rounds

  NcclBootstrap(ncclComm_t nccl, int device) : nccl_(nccl), device_(device) {}
  ~NcclBootstrap() override {
    const DeviceGuard guard(device_);
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  ncclResult_t init() {
    MOE_NCCL_CHECK(ncclCommCount(nccl_, &size_));
    MOE_NCCL_CHECK(ncclCommUserRank(nccl_, &rank_));
    const DeviceGuard guard(device_);
    if (!guard.ok()) return setLastError(ncclUnhandledCudaError, "NCCL bootstrap: cudaSetDevice(%d) failed", device_);
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    MOE_CUDA_CHECK(cudaMalloc(&scratch_, kChunkBytes * static_cast<size_t>(size_)));
    return ncclSuccess;
  }

  const char* name() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  ncclResult_t allGather(const void* mine, void* all, size_t bytes) override {
    if (bytes == 0) return ncclSuccess;
    const DeviceGuard guard(device_);
    std::vector<uint8_t> round(kChunkBytes * static_cast<size_t>(size_));
    for (size_t done = 0; done < bytes; done += kChunkBytes) {
      const size_t n = bytes - done < kChunkBytes ? bytes - done : kChunkBytes;
      uint8_t* dev = static_cast<uint8_t*>(scratch_);
      MOE_CUDA_CHECK(cudaMemcpyAsync(dev + n * rank_, static_cast<const uint8_t*>(mine) + done, n,
                                     cudaMemcpyHostToDevice, stream_));
      const ncclResult_t res = ncclAllGather(dev + n * rank_, dev, n, ncclUint8, nccl_, stream_);
      if (res != ncclSuccess) {
        return setLastError(res, "ncclAllGather (NCCL-MoE bootstrap) failed: %s (%s)", ncclGetErrorString(res),
                            ncclGetLastError(nccl_));
      }
      MOE_CUDA_CHECK(cudaMemcpyAsync(round.data(), dev, n * size_, cudaMemcpyDeviceToHost, stream_));
      MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      for (int r = 0; r < size_; ++r)
        std::memcpy(static_cast<uint8_t*>(all) + bytes * r + done, round.data() + n * r, n);
    }
    return ncclSuccess;
  }

  ncclResult_t retire(ncclMoeComm* comm) override {
    // Peers may still read or write this rank's buffer until they too are done with their device work.
    ncclResult_t res = barrier();
    releaseCommResources(comm);
    delete comm;
    return res;
  }

 private:
  ncclComm_t nccl_;
  int device_;
  int rank_ = -1, size_ = 0;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;
};

}  // namespace

ncclResult_t makeNcclBootstrap(ncclComm_t nccl, int device, std::unique_ptr<Bootstrap>* out) {
  auto b = std::make_unique<NcclBootstrap>(nccl, device);
  MOE_CHECK(b->init());
  *out = std::move(b);
  return ncclSuccess;
}

}  // namespace nccl_moe
