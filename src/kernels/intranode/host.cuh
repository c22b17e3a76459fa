// Host-side helpers shared by the high-throughput ops (notify.cu, dispatch.cu, combine.cu): the device view
// of the communicator's HT regions and a guard that makes the communicator's device current.
#pragma once

#include <cuda_runtime.h>

#include "core/comm.h"
#include "core/error.h"
#include "kernels/intranode/common.cuh"

namespace nccl_moe {
namespace ht {

inline HtDevice makeHtDevice(const ncclMoeComm* comm) {
  HtDevice d{};
  d.comm = comm->deviceComm();
  d.layout = comm->layout.ht;
  for (int r = 0; r < kMaxRanks; ++r)
    d.region[r] = comm->peer_buffer[r] != nullptr ? comm->peer_buffer[r] + comm->layout.ht_offset : nullptr;
  return d;
}

// Makes `device` current for the scope (kernels and allocations of an op go to the communicator's GPU).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

inline int resolveSms(const ncclMoeComm* comm, int num_sms) {
  int sms = num_sms > 0 ? num_sms : comm->default_num_sms;
  if (sms <= 0) sms = 24;
  if (comm->num_device_sms > 0 && sms > comm->num_device_sms) sms = comm->num_device_sms;
  return sms;
}

}  // namespace ht
}  // namespace nccl_moe
