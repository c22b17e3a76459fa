// GPU mode of moe-perf (contract in gpu_backend.h): the timer decision, one thread per local rank (gpu_rank.h),
// the progress watchdog, the progress lines on stderr (global rank 0's process) and the run's last line.
#include "gpu_backend.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gpu_rank.h"
#include "kernel_timer.h"
#include "progress.h"
#include "transport.h"

namespace nccl_moe::perf {

int runGpu(RunInfo& run, const RankLayout& layout, int num_devices) {
  (void)num_devices;
  run.iters = run.options.iters > 0 ? run.options.iters : 20;
  run.warmup = run.options.warmup >= 0 ? run.options.warmup : 5;
  ProcessState sh(run, layout);
  const std::string rv = prepareRendezvous(layout);
  if (!rv.empty()) {
    std::fprintf(stderr, "moe-perf: %s\n", rv.c_str());
    return 1;
  }
  // Ranks sharing a GPU have no NCCL communicator (host collectives, ncclMoeCommInitAll): no NCCL call at all.
  if (!layout.sharedGpu()) {
    const ncclResult_t idr = ncclGetUniqueId(&sh.id);
    if (idr != ncclSuccess) {
      std::fprintf(stderr, "moe-perf: ncclGetUniqueId failed: %s (%s)\n", ncclGetErrorString(idr),
                   ncclGetLastError(nullptr));
      return 1;
    }
  }
  if (layout.proc_rank == 0)
    out("# iters %d, warmup %d, check %d, routing %s, seed %llu\n", run.iters, run.warmup, run.options.check,
        run.options.routing.text.c_str(), static_cast<unsigned long long>(run.options.seed));
  // The timer, decided once per process before any rank thread launches work.
  std::string why;
  // Ranks sharing a GPU: a correctness run, and CUPTI's buffer flushes can wait for the whole device while a peer's
  // kernel waits for this rank: CUDA events only.
  const bool shared = layout.ranks_per_gpu > 1;
  if (run.options.timer != TimerChoice::kEvent && !shared) sh.kernel_timer = KernelTimer::instance().start(&why);
  if (shared) {
    if (layout.proc_rank == 0) out("# timer: event (ranks share a GPU: correctness run, no CUPTI)\n");
  } else if (sh.kernel_timer) {
    if (layout.proc_rank == 0)
      out("# timer: kernel (CUPTI kernel records, first kernel start to last kernel end of each call; CUDA-event "
          "times in JSON event_median_us)\n");
  } else if (run.options.timer == TimerChoice::kEvent) {
    if (layout.proc_rank == 0) out("# timer: event (CUDA events around each call, --timer event)\n");
  } else {
    // Every process that falls back says so (another process may have a working CUPTI; its rows then fall back
    // too, with the reason in the row).
    out("# timer: event (CUDA events around each call): kernel timer not available: %s\n", why.c_str());
  }

  if (layout.proc_rank == 0 && run.options.metrics.any())
    out("# metrics: time_us as below, plus the comparable metrics %s (CUDA events; notes under each table)\n",
        metricsText(run.options.metrics).c_str());

  const int n = layout.ranksPerProc();
  for (int i = 0; i < n; ++i) sh.progress[i].set("starting");
  // Progress lines on stderr: global rank 0's record, in its process only.
  std::unique_ptr<ProgressPrinter> printer;
  if (layout.firstRank() == 0 && !run.options.quiet) printer = std::make_unique<ProgressPrinter>(sh.progress[0]);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&sh, i] {
      try {
        rankMain(sh, i);
      } catch (const std::exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "moe-perf: rank %d: error: %s\n", sh.layout.firstRank() + i, e.what());
        std::fflush(stderr);
        std::_Exit(1);  // other ranks may be blocked in collectives with this one: end the process
      }
    });
  // Watchdog: a rank that makes no progress for --timeout seconds ends the run.
  std::thread watchdog([&sh, n] {
    const int64_t limit = static_cast<int64_t>(sh.run.options.timeout_s) * 1000000000LL;
    while (!sh.done.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      if (limit <= 0) continue;
      for (int i = 0; i < n; ++i) {
        if (sh.progress[i].finished.load() || nowNs() - sh.progress[i].last_ns.load() <= limit) continue;
        std::fflush(stdout);
        for (int j = 0; j < n; ++j)
          std::fprintf(stderr, "moe-perf: rank %d: no progress for %d s, last phase: %s\n", sh.layout.firstRank() + j,
                       sh.run.options.timeout_s, sh.progress[j].phase.load());
        std::fflush(stderr);
        std::_Exit(3);
      }
    }
  });
  for (auto& t : threads) t.join();
  sh.done.store(true);
  watchdog.join();
  printer.reset();
  // No CUPTI tracing or buffer callbacks while the process tears down.
  if (sh.kernel_timer) KernelTimer::instance().stop();
  if (layout.proc_rank == 0) {
    if (sh.exit_code.load() != 0) {
      out("# errors: see above (wrong results, invalid shapes, failures or unavailable MoE ops)\n");
    } else {
      out("# %s", run.options.check ? "all checks passed" : "no errors (checks skipped: -c 0)");
      if (sh.unavailable_rows.load() > 0)
        out(" (%d MoE rows not available%s)", sh.unavailable_rows.load(), layout.sharedGpu() ? "" : ": baseline only");
      if (layout.sharedGpu() || sh.distinct_gpus.load() > 0)
        out(" -- ranks shared a GPU: a correctness run, the times are not NVLink numbers");
      if (run.comm_nodes > 1) out(" -- %d nodes through the %s", run.comm_nodes, kSoftNicLabel);
      out("\n");
    }
  }
  return sh.exit_code.load();
}

}  // namespace nccl_moe::perf
