// The CPU thread of a proxy: calls one progress function in a loop (backoff when idle, host_wait.h) until stopped
// or until it fails. Two proxies use it: the request proxy (rdma::RequestProxy::progress(), turning descriptors into
// WQEs) and the doorbell proxy (dbproxy::DoorbellProxy::progress(), forwarding doorbells the GPU left in host
// mailboxes, src/transport/rdma/dbproxy/doorbell_proxy.h). The thread sets its CUDA device and its stream-capture
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
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "transport/rdma/request_proxy.h"

namespace nccl_moe::proxy {

// One pass of a proxy: sets *progressed when it did work; a failure is sticky (the thread stops polling).
using ProgressFn = std::function<ncclResult_t(bool* progressed)>;
// The message of the failure progress() returned.
using ErrorFn = std::function<std::string()>;

class ProxyThread {
 public:
  // `proxy` must outlive the thread (stop() or the destructor). cuda_device < 0: leave the device alone.
  ProxyThread(rdma::RequestProxy* proxy, int cuda_device);
  // Any proxy: `what` names it in messages ("request proxy", "doorbell proxy"); the functions' captures must
  // outlive the thread.
  ProxyThread(const char* what, ProgressFn progress, ErrorFn error, int cuda_device)
      : what_(what), progress_(std::move(progress)), error_of_(std::move(error)), cuda_device_(cuda_device) {}
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

  const char* what_;
  ProgressFn progress_;
  ErrorFn error_of_;
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
