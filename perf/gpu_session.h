// The NCCL-MoE communicator and handle of one rank for one mode (HT or LL): created collectively with the mode's
// capacity, checked for asynchronous errors after each run, destroyed at the end of the mode. A session that could
// not be created, or that recorded an asynchronous error, is not usable: every later MoE row of the mode is
// "not available" with its error text.
#pragma once

#include <cstddef>
#include <string>

#include "collective.h"
#include "nccl_moe.h"
#include "options.h"
#include "rank_device.h"

namespace nccl_moe::perf {

// "<fn> returned <result>: <ncclMoeGetLastError(comm)>".
std::string apiError(const char* fn, ncclResult_t r, ncclMoeComm_t comm);

struct MoeSession {
  ncclMoeComm_t comm = nullptr;
  ncclMoeHandle_t handle = nullptr;
  bool usable = false;
  std::string error;
  size_t buffer_bytes = 0;

  // Collective: ncclMoeCommInit on the rank's NCCL communicator, then a handle; the ranks agree on each step.
  void init(const RankDevice& rd, Collective& col, const ModeConfig& cfg, int capacity);
  // ncclSuccess on every rank, else marks the session broken (every later MoE row is "not available").
  bool checkAsync(Collective& col, std::string* err);
  void destroy();
};

}  // namespace nccl_moe::perf
