// The all-to-all baseline on the CPU: host threads as ranks, memcpy as the transport, following the same index
// plans (plan.h) as the NCCL baseline on the GPU. Used by CPU mode (and by unit tests to check the plans).
//
// Contract
//   - RankTeam runs one function on R persistent threads (thread r = rank r) and offers a barrier among them
//     (harness::HostBarrier, bounded: a rank that does not arrive within the team's timeout makes barrier() throw
//     std::runtime_error on the others; run() rethrows the first exception any rank thread threw).
//   - Each op is: permutation into per-destination order (gather), barrier, every rank pulls its groups from the
//     peers' send buffers (the all-to-all), un-permutation (scatter into slabs for LL dispatch, FP32 reduction into
//     [T, H] bf16 for the combines, in the reference's order), barrier. Times are measured by rank 0 between the
//     first and the last barrier (microseconds).
//   - Outputs are comparable with verify.h: HT dispatch recv rows are packed rows in MoE receive order, LL dispatch
//     rows are packed rows in the reference's slab layout, combine outputs equal ref::ht_combine / ref::ll_combine.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "harness/barrier.h"
#include "plan.h"
#include "problem.h"

namespace nccl_moe::perf {

class RankTeam {
 public:
  // `barrier_timeout_s`: how long barrier() waits for the other ranks before it gives up.
  explicit RankTeam(int num_ranks, double barrier_timeout_s = 600.0);
  ~RankTeam();
  RankTeam(const RankTeam&) = delete;
  RankTeam& operator=(const RankTeam&) = delete;
  int size() const { return num_ranks_; }
  // Runs fn(rank) on every rank thread; returns when all have returned, rethrowing the first exception of any.
  void run(const std::function<void(int)>& fn);
  // Called from inside fn by every rank. Throws std::runtime_error when another rank does not arrive in time.
  void barrier();

 private:
  void worker(int rank);
  int num_ranks_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable cv_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t job_generation_ = 0;
  int running_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;  // the first exception of the current run()
  bool broken_ = false;       // a run() failed: the barrier may be out of step, later runs are refused
  double barrier_timeout_s_;
  harness::HostBarrier barrier_;
};

// Median of the values (0 for none).
double median(std::vector<double> values);

class CpuBaseline {
 public:
  // Needs every rank's inputs in `p` (CPU mode builds them all).
  CpuBaseline(const Problem& p, RankTeam* team);
  // One call of each op; returns rank 0's measured time in microseconds.
  double dispatch();
  double combine();

  // Outputs of the last calls.
  std::vector<std::vector<uint8_t>> dispatch_out;  // HT [R][N_d * rowBytes]; LL [R][E_l * slab * rowBytes]
  std::vector<std::vector<uint16_t>> combine_out;  // [R][T * H]
  int64_t dispatchWrong() const;                   // against the problem's expected results (verify.h)
  int64_t combineWrong() const;

 private:
  const Problem& p_;
  RankTeam* team_;
  std::vector<HtPlan> ht_;
  std::vector<LlPlan> ll_;
  std::vector<std::vector<uint8_t>> input_;   // [R][T * rowBytes] packed rows
  std::vector<std::vector<uint8_t>> send_;    // [R] dispatch send buffers
  std::vector<std::vector<uint16_t>> csend_;  // [R] LL combine send buffers
  std::vector<std::vector<uint16_t>> crecv_;  // [R] combine receive buffers
};

}  // namespace nccl_moe::perf
