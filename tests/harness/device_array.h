// The one device-buffer wrapper of the tests and moe-perf: a typed device array that frees itself. Failures of
// CUDA calls throw harness::Error (the rank runner of tests/harness/world.h turns it into a test failure; moe-perf
// catches it at the top of each rank thread). Copies are synchronous: stream-ordered on the given stream and then
// waited for; without a stream they run on the legacy default stream (which the ranks' non-blocking streams do not
// wait for, so they are complete when the call returns).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace harness {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string cudaFailure(const char* call, cudaError_t e, const char* file, int line) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%s failed: %s (%s) at %s:%d", call, cudaGetErrorName(e), cudaGetErrorString(e), file,
                line);
  return buf;
}

}  // namespace harness

#define HARNESS_CUDA(call)                                                                     \
  do {                                                                                         \
    const cudaError_t harness_err_ = (call);                                                   \
    if (harness_err_ != cudaSuccess)                                                           \
      throw ::harness::Error(::harness::cudaFailure(#call, harness_err_, __FILE__, __LINE__)); \
  } while (0)

namespace harness {

template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t count) { allocate(count); }
  ~DeviceArray() { release(); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept : ptr_(o.ptr_), count_(o.count_) {
    o.ptr_ = nullptr;
    o.count_ = 0;
  }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = o.ptr_;
      count_ = o.count_;
      o.ptr_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }

  // At least one element is allocated, so the pointer is never null; the contents are zeroed.
  void allocate(size_t count) {
    release();
    count_ = count;
    HARNESS_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr_), (count ? count : 1) * sizeof(T)));
    fill(0);
  }
  void release() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  // Allocates v.size() elements and copies v in.
  void assign(const std::vector<T>& v, cudaStream_t stream = cudaStreamLegacy) {
    allocate(v.size());
    upload(v.data(), v.size(), stream);
  }
  void upload(const T* src, size_t count, cudaStream_t stream = cudaStreamLegacy) {
    if (count == 0) return;
    HARNESS_CUDA(cudaMemcpyAsync(ptr_, src, count * sizeof(T), cudaMemcpyHostToDevice, stream));
    HARNESS_CUDA(cudaStreamSynchronize(stream));
  }
  // Copies the bytes of v to the start of the array (any element type U).
  template <typename U>
  void uploadBytes(const std::vector<U>& v, cudaStream_t stream = cudaStreamLegacy) {
    if (v.empty()) return;
    HARNESS_CUDA(cudaMemcpyAsync(ptr_, v.data(), v.size() * sizeof(U), cudaMemcpyHostToDevice, stream));
    HARNESS_CUDA(cudaStreamSynchronize(stream));
  }
  // Waits for the stream, then copies the first `count` elements (of type U, default T) out.
  template <typename U = T>
  std::vector<U> download(size_t count, cudaStream_t stream = cudaStreamLegacy) const {
    std::vector<U> v(count);
    if (count == 0) return v;
    HARNESS_CUDA(cudaMemcpyAsync(v.data(), ptr_, count * sizeof(U), cudaMemcpyDeviceToHost, stream));
    HARNESS_CUDA(cudaStreamSynchronize(stream));
    return v;
  }
  // Every byte set to `byte`, complete on return.
  void fill(int byte, cudaStream_t stream = cudaStreamLegacy) {
    HARNESS_CUDA(cudaMemsetAsync(ptr_, byte, (count_ ? count_ : 1) * sizeof(T), stream));
    HARNESS_CUDA(cudaStreamSynchronize(stream));
  }
  // Stream-ordered zeroing (not waited for).
  void zeroAsync(cudaStream_t stream) {
    HARNESS_CUDA(cudaMemsetAsync(ptr_, 0, (count_ ? count_ : 1) * sizeof(T), stream));
  }
  T* get() const { return ptr_; }
  // The same memory viewed as U (byte buffers holding typed data).
  template <typename U>
  U* as() const {
    return reinterpret_cast<U*>(ptr_);
  }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// A byte buffer (inputs and outputs of several element types).
using DeviceBytes = DeviceArray<unsigned char>;

}  // namespace harness
