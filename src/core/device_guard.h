// Makes a CUDA device current for a scope and restores the caller's current device afterwards. Every host
// operation of a communicator runs under one (its kernels, allocations and streams belong to the
// communicator's device, whatever the calling thread had current).
#pragma once

#include <cuda_runtime.h>

namespace nccl_moe {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      (void)cudaGetLastError();
      previous_ = -1;
    }
    if (device >= 0 && device != previous_) {
      switched_ = true;
      ok_ = cudaSetDevice(device) == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (switched_ && previous_ >= 0) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  // Whether the device is current (cudaSetDevice succeeded, or it was current already).
  bool ok() const { return ok_; }
  // The caller's current device before the guard (-1 if it could not be read).
  int previous() const { return previous_; }

 private:
  int previous_ = -1;
  bool switched_ = false;
  bool ok_ = true;
};

}  // namespace nccl_moe
