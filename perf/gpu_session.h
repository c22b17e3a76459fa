// The NCCL-MoE communicator and handle of one rank for one mode (HT or LL): created collectively with the mode's
// capacity, checked for asynchronous errors after each run, destroyed at the end of the mode. A session that could
// not be created, or that recorded an asynchronous error, is not usable: every later MoE row of the mode is
// "not available" with its error text.
//
// Two ways to make the communicators:
//   - one rank per GPU: ncclMoeCommInit on each rank's NCCL communicator (collective over it);
//   - ranks sharing a GPU (SharedGpuWorld): one ncclMoeCommInitAll for every rank of the process, called by rank 0's
//     thread while the others wait at Collective::quiesce(); no NCCL communicator exists. Those communicators are
//     destroyed one by one (not collectively), each after every rank's stream is drained.
// Allocations and frees (communicator buffers, handles) happen between two Collective::quiesce() calls, so that ranks
// sharing a GPU never allocate while a peer's kernel waits for them.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "collective.h"
#include "nccl_moe.h"
#include "options.h"
#include "rank_device.h"

namespace nccl_moe::perf {

// "<fn> returned <result>: <ncclMoeGetLastError(comm)>".
std::string apiError(const char* fn, ncclResult_t r, ncclMoeComm_t comm);

// The communicators of the ranks that share GPUs in this process (ncclMoeCommInitAll), one mode at a time.
struct SharedGpuWorld {
  std::vector<int> devices;          // [rank] CUDA device (rank r on GPU r / ranks per GPU)
  std::vector<ncclMoeComm_t> comms;  // [rank] this mode's communicators, filled by rank 0's thread
  ncclResult_t result = ncclSuccess;
  std::string error;  // why ncclMoeCommInitAll failed (its caller's ncclMoeGetLastError)
};

// Nodes of the one-process world of ranks on `devices` (ncclMoeCommInitAll, the world of ranks sharing a GPU): a
// world of the smallest LL config is made, asked with ncclMoeCommNodeCount and destroyed, from the calling thread,
// before any rank thread starts, so that moe-perf can refuse what cannot run on it (nodes of unequal size, a
// --ranks-per-node that disagrees) before any MoE call and label the run in its header. "" or why the world could
// not be made (*num_nodes is then 1).
std::string probeWorldNodes(const std::vector<int>& devices, int* num_nodes);

struct MoeSession {
  ncclMoeComm_t comm = nullptr;
  ncclMoeHandle_t handle = nullptr;
  bool usable = false;
  std::string error;
  size_t buffer_bytes = 0;
  int num_nodes = 1;  // ncclMoeCommNodeCount of a usable session (0: the query failed)

  // Collective: the communicator (ncclMoeCommInit on the rank's NCCL communicator, or the rank's share of one
  // ncclMoeCommInitAll when `world` is given), then a handle; the ranks agree on each step.
  void init(const RankDevice& rd, Collective& col, const ModeConfig& cfg, int capacity, SharedGpuWorld* world);
  // ncclSuccess on every rank, else marks the session broken (every later MoE row is "not available").
  bool checkAsync(Collective& col, std::string* err);
  // Collective: every rank calls it at the same point.
  void destroy(Collective& col);
};

}  // namespace nccl_moe::perf
