// Multi-rank harness of the high-throughput GPU tests: one thread per GPU in one process (ncclCommInitAll,
// peer access), a bounded host barrier, device buffers, and the upload of reference-generated inputs.
// The CPU reference (src/reference/reference.h) is the oracle: inputs are generated from it and results are
// compared with it bitwise.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "nccl_moe.h"
#include "reference/reference.h"

namespace ht_test {

namespace ref = nccl_moe::ref;

#define HT_CUDA_OK(x) ASSERT_EQ(cudaSuccess, (x)) << #x << ": " << cudaGetErrorString(cudaGetLastError())
#define HT_MOE_OK(comm, x) ASSERT_EQ(ncclSuccess, (x)) << #x << ": " << ncclMoeGetLastError(comm)

inline int gpuCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

// Ranks of the world: every GPU, at most 8 (the intranode limit).
inline int worldSize() {
  const int n = gpuCount();
  return n > 8 ? 8 : n;
}

// Multi-rank tests need 2 GPUs; NCCL_MOE_HT_TEST_ONE_RANK=1 lets them run on one GPU as a single rank
// (local paths only: no NVLink traffic), for machines with one GPU.
inline int minRanks() {
  const char* v = std::getenv("NCCL_MOE_HT_TEST_ONE_RANK");
  return v != nullptr && v[0] == '1' ? 1 : 2;
}

// Host barrier between the rank threads; gives up (returns false) after `timeout_s` so that a rank that
// failed early cannot hang the others forever.
class HostBarrier {
 public:
  explicit HostBarrier(int n) : n_(n) {}
  bool wait(double timeout_s = 120.0) {
    std::unique_lock<std::mutex> lock(mu_);
    const long long gen = generation_;
    if (++count_ == n_) {
      count_ = 0;
      ++generation_;
      cv_.notify_all();
      return true;
    }
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return generation_ != gen; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_;
  int count_ = 0;
  long long generation_ = 0;
};

// NCCL communicators over the first n GPUs; run() calls fn(rank) on one thread per rank.
class World {
 public:
  explicit World(int n) : n_(n), nccl_(n), barrier_(n) {
    std::vector<int> devs(n);
    for (int i = 0; i < n; ++i) devs[i] = i;
    ok_ = ncclCommInitAll(nccl_.data(), n, devs.data()) == ncclSuccess;
  }
  ~World() {
    if (ok_)
      for (auto c : nccl_) ncclCommDestroy(c);
  }
  bool ok() const { return ok_; }
  int size() const { return n_; }
  ncclComm_t nccl(int r) const { return nccl_[r]; }
  HostBarrier& barrier() { return barrier_; }

  template <typename Fn>
  void run(Fn fn) {
    std::vector<std::thread> threads;
    for (int r = 0; r < n_; ++r) {
      threads.emplace_back([&, r] {
        cudaSetDevice(r);
        fn(r);
      });
    }
    for (auto& t : threads) t.join();
  }

 private:
  int n_;
  std::vector<ncclComm_t> nccl_;
  HostBarrier barrier_;
  bool ok_ = false;
};

// Device buffer (bytes), freed on scope exit. Every fill and upload is complete when the call returns: they
// run on the legacy default stream, which the tests' non-blocking streams do not wait for.
class DevBuf {
 public:
  DevBuf() = default;
  explicit DevBuf(size_t bytes) { alloc(bytes); }
  ~DevBuf() { release(); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; o.bytes_ = 0; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      o.ptr_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  void alloc(size_t bytes) {
    release();
    bytes_ = bytes;
    if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
    if (ptr_ != nullptr) cudaMemset(ptr_, 0, bytes);
    cudaStreamSynchronize(cudaStreamLegacy);
  }
  void release() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }
  template <typename T>
  void upload(const std::vector<T>& v) {
    if (!v.empty()) cudaMemcpy(ptr_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    cudaStreamSynchronize(cudaStreamLegacy);
  }
  template <typename T>
  std::vector<T> download(size_t count) const {
    std::vector<T> v(count);
    if (count > 0) cudaMemcpy(v.data(), ptr_, count * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
  void fill(int byte) {
    if (ptr_ != nullptr) cudaMemset(ptr_, byte, bytes_);
    cudaStreamSynchronize(cudaStreamLegacy);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

inline std::vector<int32_t> toInt32(const std::vector<int64_t>& v) { return std::vector<int32_t>(v.begin(), v.end()); }

// Scales of fp8 rows laid out with the caller strides (in 4-byte words) the dispatch accepts.
inline std::vector<int32_t> stridedScales(const ref::Rows& rows, int64_t token_stride, int64_t word_stride) {
  const bool ue8m0 = rows.scale_format == ref::ScaleFormat::kUe8m0;
  const int words = ue8m0 ? ref::num_packed_scales(rows.hidden) : ref::num_scale_groups(rows.hidden);
  const int64_t ts = token_stride > 0 ? token_stride : words, ws = word_stride > 0 ? word_stride : 1;
  const size_t size = rows.num_rows == 0 ? 0 : static_cast<size_t>((rows.num_rows - 1) * ts + (words - 1) * ws + 1);
  std::vector<int32_t> out(size, 0x7f7f7f7f);
  for (int t = 0; t < rows.num_rows; ++t)
    for (int w = 0; w < words; ++w) {
      int32_t v;
      if (ue8m0)
        v = rows.packed_scales[static_cast<size_t>(t) * words + w];
      else
        std::memcpy(&v, &rows.scales[static_cast<size_t>(t) * words + w], 4);
      out[static_cast<size_t>(t * ts + w * ws)] = v;
    }
  return out;
}

// First index where a and b differ, or -1.
template <typename T>
long long firstDiff(const T* a, const T* b, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<long long>(i);
  return -1;
}

}  // namespace ht_test
