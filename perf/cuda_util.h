// CUDA/NCCL helpers of moe-perf's GPU backend: checks that throw PerfError (caught at the top of each rank thread,
// which then fails the run), device buffers, stream-ordered copies.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace nccl_moe::perf {

struct PerfError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string cudaFailure(const char* call, cudaError_t e, const char* file, int line) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%s failed: %s (%s) at %s:%d", call, cudaGetErrorName(e), cudaGetErrorString(e), file,
                line);
  return buf;
}
inline std::string ncclFailure(const char* call, ncclResult_t r, const char* file, int line) {
  char buf[768];
  std::snprintf(buf, sizeof(buf), "%s failed: %s (%s) at %s:%d", call, ncclGetErrorString(r), ncclGetLastError(nullptr),
                file, line);
  return buf;
}

#define PERF_CUDA(call)                                                                                       \
  do {                                                                                                        \
    cudaError_t perf_err_ = (call);                                                                           \
    if (perf_err_ != cudaSuccess)                                                                             \
      throw ::nccl_moe::perf::PerfError(::nccl_moe::perf::cudaFailure(#call, perf_err_, __FILE__, __LINE__)); \
  } while (0)

#define PERF_NCCL(call)                                                                                       \
  do {                                                                                                        \
    ncclResult_t perf_res_ = (call);                                                                          \
    if (perf_res_ != ncclSuccess)                                                                             \
      throw ::nccl_moe::perf::PerfError(::nccl_moe::perf::ncclFailure(#call, perf_res_, __FILE__, __LINE__)); \
  } while (0)

// Device array of T (at least one element so that pointers are never null). Not copyable.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t count) { allocate(count); }
  ~DeviceArray() { release(); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  void allocate(size_t count) {
    release();
    count_ = count;
    PERF_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr_), (count ? count : 1) * sizeof(T)));
  }
  void release() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  // Allocates to v.size() and copies v in (stream-ordered, then waits).
  void assign(const std::vector<T>& v, cudaStream_t stream) {
    allocate(v.size());
    upload(v.data(), v.size(), stream);
  }
  void upload(const T* src, size_t count, cudaStream_t stream) {
    if (count == 0) return;
    PERF_CUDA(cudaMemcpyAsync(ptr_, src, count * sizeof(T), cudaMemcpyHostToDevice, stream));
    PERF_CUDA(cudaStreamSynchronize(stream));
  }
  // Waits for the stream, then copies the first `count` elements out.
  std::vector<T> download(size_t count, cudaStream_t stream) const {
    std::vector<T> v(count);
    if (count == 0) return v;
    PERF_CUDA(cudaMemcpyAsync(v.data(), ptr_, count * sizeof(T), cudaMemcpyDeviceToHost, stream));
    PERF_CUDA(cudaStreamSynchronize(stream));
    return v;
  }
  void zero(cudaStream_t stream) { PERF_CUDA(cudaMemsetAsync(ptr_, 0, (count_ ? count_ : 1) * sizeof(T), stream)); }
  T* get() const { return ptr_; }
  size_t size() const { return count_; }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// One rank as the GPU backend sees it.
struct RankDevice {
  int rank = 0;
  int num_ranks = 1;
  int device = 0;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
};

}  // namespace nccl_moe::perf
