// The host object behind ncclMoeComm_t. Owns the communication buffer, the peer mappings, the host-mapped
// error record and the internal stream; hands kernels a DeviceComm (src/device/device_comm.h).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <mutex>
#include <string>

#include "device/device_comm.h"
#include "mem/buffer_layout.h"
#include "nccl_moe.h"

struct ncclMoeComm {
  int rank = -1;
  int num_ranks = 0;
  int device = -1;
  int num_device_sms = 0;       // multiprocessors of this rank's GPU
  int default_num_sms = 0;      // HT SM budget when a call passes 0
  ncclComm_t nccl = nullptr;    // the user's communicator (not owned)
  ncclMoeConfig_t config{};
  nccl_moe::LayoutParams params{};
  nccl_moe::BufferLayout layout{};

  uint8_t* buffer = nullptr;                              // this rank's communication buffer
  uint8_t* peer_buffer[nccl_moe::kMaxRanks] = {};         // every rank's buffer as mapped here (own included)
  bool peer_via_ipc[nccl_moe::kMaxRanks] = {};            // opened with cudaIpcOpenMemHandle (close on destroy)
  bool peer_same_process[nccl_moe::kMaxRanks] = {};

  nccl_moe::ErrorRecord* host_error = nullptr;  // host-mapped error record: host view
  nccl_moe::ErrorRecord* dev_error = nullptr;   //                           device view
  int* host_scratch = nullptr;                  // host-mapped ints the notify kernel publishes counts into
  int* dev_scratch = nullptr;
  int host_scratch_ints = 0;

  cudaStream_t internal_stream = nullptr;
  uint64_t timeout_ns = 0;
  int ll_next_half = 0;       // LL double buffering: which half the next LL dispatch uses
  int ht_host_seq = 0;        // HT host-count notify: sequence the kernel publishes in host_scratch[0]
  unsigned long long* ll_dispatch_trace = nullptr;  // diagnostics only: see src/kernels/low_latency/trace.h

  std::mutex error_mutex;
  std::string last_error;     // last failure of a call on this communicator
  std::atomic<bool> failed{false};

  nccl_moe::DeviceComm deviceComm() const {
    nccl_moe::DeviceComm d{};
    d.rank = rank;
    d.num_ranks = num_ranks;
    for (int i = 0; i < nccl_moe::kMaxRanks; ++i) d.peer_buffer[i] = peer_buffer[i];
    d.error = dev_error;
    d.timeout_ns = timeout_ns;
    return d;
  }
};

namespace nccl_moe {

// Checks the host-mapped error record; if a device wait failed, formats "phase X: rank r waited for peer p,
// counter c (expected e)" ("... for a block of its own" when the wait was local) into the comm's last error and
// returns the matching error.
ncclResult_t checkAsyncError(ncclMoeComm* comm);
// Waits (bounded by comm->timeout_ns) until *flag >= target, polling host-mapped memory.
ncclResult_t hostWaitGeq(ncclMoeComm* comm, const volatile int* flag, int target, const char* what);

}  // namespace nccl_moe
