// The small, trivially copyable view of a communicator that kernels receive by value. Host objects
// (src/core/comm.h) own the resources; kernels see only this.
#pragma once

#include <cstdint>

#include "nccl_moe.h"

namespace nccl_moe {

constexpr int kMaxRanks = NCCL_MOE_MAX_RANKS;
constexpr int kMaxTopk = NCCL_MOE_MAX_TOPK;

// Where a bounded device wait was stuck when it expired. Stable numbers: they appear in error messages.
enum class Phase : int {
  kNone = 0,
  kBarrier = 1,
  kHtNotify = 2,
  kHtDispatch = 3,
  kHtCombine = 4,
  kLlDispatchRecv = 5,
  kLlCombineRecv = 6,
};
const char* phaseName(Phase phase);

// First device-side failure of a communicator, in host-mapped memory (written by the GPU with system-scope
// atomics, read by the host without synchronising). `code` goes 0 -> non-zero once; the other fields are
// written by the winner before it publishes `code` with release ordering.
struct ErrorRecord {
  int code;            // 0 = none, 1 = wait timeout, 3 = capacity exceeded (ErrorCode)
  int phase;           // Phase
  int rank;            // rank that observed the failure
  int peer;            // peer it was waiting for (-1 = none/local)
  long long counter;   // value seen last
  long long expected;  // value waited for
};

enum ErrorCode : int { kErrNone = 0, kErrTimeout = 1, kErrCapacity = 3 };

struct DeviceComm {
  int rank;
  int num_ranks;
  // Base of every rank's communication buffer as mapped in this process (own rank included). Offsets
  // inside come from BufferLayout (src/mem/buffer_layout.h) only.
  uint8_t* peer_buffer[kMaxRanks];
  ErrorRecord* error;       // host-mapped, this rank's record
  uint64_t timeout_ns;      // bound of every device wait (NCCL_MOE_TIMEOUT_S)
};

}  // namespace nccl_moe
