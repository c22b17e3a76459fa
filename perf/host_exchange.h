// The rank threads of one moe-perf process meeting and exchanging data in host memory: the bounded barrier every
// host wait of the GPU backend goes through (meet), and HostExchange, the shared memory behind the host collectives
// of ranks that share a GPU (collective.h). Pure host code (no CUDA, no NCCL), unit-tested.
//
// Contract
//   - Every wait is bounded: a rank that does not arrive within the timeout makes the others throw
//     std::runtime_error naming the step (the rank thread's catch then fails the run). A barrier that timed out is
//     not reused (harness::HostBarrier), the run ends.
//   - HostExchange: every rank calls each operation with its own rank index, in the same order on every rank.
//     exchange() returns every rank's bytes in rank order; allReduce() reduces in rank order, so every rank gets the
//     same bits; allGather() concatenates in rank order. Every rank must pass the same size (checked).
#pragma once

#include <string>
#include <vector>

#include "harness/barrier.h"

namespace nccl_moe::perf {

enum class ReduceOp : int { kMin, kMax, kSum };

// The rank threads of this process meet at `barrier`; one that does not arrive within timeout_s fails the run
// (std::runtime_error naming `what`).
void meet(harness::HostBarrier& barrier, double timeout_s, const char* what);

class HostExchange {
 public:
  // `timeout_s`: how long a rank waits for the others at each step before it fails the run.
  HostExchange(int num_ranks, double timeout_s);
  HostExchange(const HostExchange&) = delete;
  HostExchange& operator=(const HostExchange&) = delete;
  int size() const { return static_cast<int>(slots_.size()); }

  // Every rank's bytes, in rank order.
  std::vector<std::vector<char>> exchange(int rank, const std::vector<char>& mine);
  // Element-wise reduction over the ranks, in rank order.
  std::vector<double> allReduce(int rank, const std::vector<double>& values, ReduceOp op);
  // [R * mine.size()]: every rank's bytes, in rank order.
  std::vector<char> allGather(int rank, const std::vector<char>& mine);
  // Returns once every rank has called it.
  void meet(const char* what);

 private:
  harness::HostBarrier barrier_;
  double timeout_s_;
  std::vector<std::vector<char>> slots_;  // [rank]: this step's bytes
};

}  // namespace nccl_moe::perf
