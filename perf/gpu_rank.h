// One GPU rank of moe-perf from start to end, on its own host thread: device, stream and collectives (NCCL, or the
// host collectives when ranks share a GPU); where every rank runs (printed by rank 0 with the topology); the start
// gate; then per mode the MoE session and per dtype / size / SM budget the baseline and MoE runs (gpu_run.h),
// reduced over ranks (gpu_aggregate.h) into the rows rank 0 prints and writes. ProcessState is what the rank
// threads of one process share.
//
// Ranks sharing a GPU (layout.sharedGpu()): no NCCL call at all (no ncclComm_t, no baseline: its rows say
// "baseline: n/a (ranks share a GPU)"), MoE communicators from one ncclMoeCommInitAll (SharedGpuWorld), and every
// allocation or free between two Collective::quiesce() calls. Every MoE call is still verified bitwise against the
// CPU reference.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "gpu_run.h"
#include "harness/barrier.h"
#include "launcher.h"
#include "problem.h"
#include "run_common.h"

namespace nccl_moe::perf {

struct ProcessState {
  RunInfo& run;
  RankLayout layout;
  ncclUniqueId id{};
  harness::HostBarrier barrier;      // the rank threads of this process
  double host_wait_s;                // bound of every wait at `barrier`
  std::unique_ptr<Problem> problem;  // built by local rank 0 for every size, shared by the process's ranks
  std::string problem_error;
  std::unique_ptr<Progress[]> progress;
  std::atomic<int> exit_code{0};
  std::atomic<int> unavailable_rows{0};  // counted by the printing rank
  std::atomic<bool> done{false};
  std::atomic<int> distinct_gpus{0};  // processes sharing GPUs: distinct (host, bus id) pairs of all ranks, else 0
  bool kernel_timer = false;  // the CUPTI kernel timer is on in this process (decided once, before the rank threads)
  // Ranks sharing a GPU only (null otherwise): the host collectives' shared memory and the MoE communicators.
  std::unique_ptr<HostExchange> exchange;
  std::unique_ptr<SharedGpuWorld> world;

  ProcessState(RunInfo& r, const RankLayout& l)
      : run(r),
        layout(l),
        barrier(l.ranksPerProc()),
        host_wait_s(hostWaitSeconds(r.options)),
        progress(new Progress[static_cast<size_t>(l.ranksPerProc())]) {
    if (l.sharedGpu()) {
      exchange = std::make_unique<HostExchange>(l.numRanks(), host_wait_s);
      world = std::make_unique<SharedGpuWorld>();
      for (int i = 0; i < l.numRanks(); ++i) world->devices.push_back(l.deviceOf(i));
    }
  }
  void fail(int code) {
    int cur = exit_code.load();
    while (code > cur && !exit_code.compare_exchange_weak(cur, code)) {
    }
  }
};

// The rank thread of local rank `local` (0 .. ranks per process - 1). Throws harness::Error on CUDA/NCCL failures.
void rankMain(ProcessState& sh, int local);

}  // namespace nccl_moe::perf
