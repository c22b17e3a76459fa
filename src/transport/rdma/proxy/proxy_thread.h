// The CPU thread of the request proxy: calls rdma::RequestProxy::progress() in a loop (backoff when idle,
// host_wait.h) until stopped or until the proxy fails. The thread sets its CUDA device and its stream-capture
// mode to relaxed first (another thread's graph capture must not make calls on this thread fail; progress()
// itself touches only host memory) and uses precise sleeps.
//
// Failure: progress()'s sticky error is already in the ring's error word (the GPU's waits see it); the thread
// keeps the message (error()) and stops polling. stop() is bounded: progress() never blocks, so the thread
// leaves its loop within one pass plus one backoff sleep (at most 100 us); stop() waits for that up to its
// timeout and reports a thread that did not leave (it then still joins: the thread uses memory the caller frees).
#pragma once

#include <nccl.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

#include "transport/rdma/request_proxy.h"

namespace nccl_moe::proxy {

class ProxyThread {
 public:
  // `proxy` must outlive the thread (stop() or the destructor). cuda_device < 0: leave the device alone.
  ProxyThread(rdma::RequestProxy* proxy, int cuda_device) : proxy_(proxy), cuda_device_(cuda_device) {}
  ~ProxyThread() { stop(); }
  ProxyThread(const ProxyThread&) = delete;
  ProxyThread& operator=(const ProxyThread&) = delete;

  ncclResult_t start();
  // Returns ncclSuccess, or ncclSystemError when the thread took longer than timeout_s to leave its loop.
  ncclResult_t stop(double timeout_s = 5.0);

  bool running() const { return running_.load(std::memory_order_acquire); }
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  // The thread left its loop (stopped, or failed): the proxy may be inspected from another thread.
  bool exited() const { return !running() || exited_.load(std::memory_order_acquire); }
  std::string error() const;
  uint64_t passes() const { return passes_.load(std::memory_order_relaxed); }

 private:
  void run();

  rdma::RequestProxy* proxy_;
  int cuda_device_;
  std::thread thread_;
  std::atomic<bool> running_{false};
  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> exited_{false};
  std::atomic<bool> failed_{false};
  std::atomic<uint64_t> passes_{0};
  mutable std::mutex mu_;
  std::string error_;
};

}  // namespace nccl_moe::proxy
