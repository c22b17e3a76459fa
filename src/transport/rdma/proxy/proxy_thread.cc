#include "transport/rdma/proxy/proxy_thread.h"

#include <cuda_runtime_api.h>

#include "core/error.h"
#include "core/log.h"
#include "transport/rdma/host_wait.h"

namespace nccl_moe::proxy {

ProxyThread::ProxyThread(rdma::RequestProxy* proxy, int cuda_device)
    : what_("request proxy"),
      progress_(proxy == nullptr ? ProgressFn() : ProgressFn([proxy](bool* p) { return proxy->progress(p); })),
      error_of_([proxy] { return proxy == nullptr ? std::string() : proxy->error(); }),
      cuda_device_(cuda_device) {}

ncclResult_t ProxyThread::start() {
  MOE_ARG_CHECK(static_cast<bool>(progress_), "ProxyThread::start: no %s to run", what_);
  if (running()) return setLastError(ncclInvalidUsage, "ProxyThread::start: the thread is already running");
  stop_requested_.store(false, std::memory_order_release);
  exited_.store(false, std::memory_order_release);
  running_.store(true, std::memory_order_release);
  thread_ = std::thread([this] { run(); });
  return ncclSuccess;
}

ncclResult_t ProxyThread::stop(double timeout_s) {
  if (!thread_.joinable()) return ncclSuccess;
  stop_requested_.store(true, std::memory_order_release);
  rdma::Deadline deadline(timeout_s);
  bool late = false;
  while (!exited_.load(std::memory_order_acquire)) {
    if (deadline.expired()) {
      late = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  thread_.join();
  running_.store(false, std::memory_order_release);
  if (late)
    return setLastError(ncclSystemError, "ProxyThread::stop: the %s thread did not leave its loop within %.3f s", what_,
                        timeout_s);
  return ncclSuccess;
}

std::string ProxyThread::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void ProxyThread::run() {
  rdma::usePreciseSleeps();
  if (cuda_device_ >= 0) {
    cudaSetDevice(cuda_device_);
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
  }
  rdma::Backoff backoff;
  bool failed = false;
  while (!stop_requested_.load(std::memory_order_acquire)) {
    bool progressed = false;
    const ncclResult_t r = progress_(&progressed);
    passes_.fetch_add(1, std::memory_order_relaxed);
    if (r != ncclSuccess) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        error_ = error_of_();
      }
      MOE_WARN("%s thread stops: %s", what_, error().c_str());
      failed = true;
      break;
    }
    if (progressed)
      backoff.reset();
    else
      backoff.pause();
  }
  // Left the loop first, failed second: whoever sees failed() also sees exited() (and the message).
  exited_.store(true, std::memory_order_release);
  if (failed) failed_.store(true, std::memory_order_release);
}

}  // namespace nccl_moe::proxy
