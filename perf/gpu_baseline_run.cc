// The NCCL all-to-all baseline run of one rank for one size (contract in gpu_run.h; the baseline itself is
// gpu_baseline.h): a verification pass against the reference, then timed dispatch/combine and timed count
// exchange + dispatch, with the same barriers and timers as the MoE ops next to it.
#include "gpu_baseline.h"
#include "gpu_run.h"

namespace nccl_moe::perf {

void runBaseline(const Problem& p, const RankDevice& rd, Collective& col, const RunInfo& run, const Timing& tm,
                 Progress& prog, BaselineResult* res) {
  const bool check = run.options.check != 0;
  prog.set("baseline: setup");
  GpuBaseline bl(p, rd);
  prog.set("baseline: verification pass");
  col.barrier();
  bl.countExchange();
  bl.dispatch();
  HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
  if (check) res->dispatch.wrong = res->first.wrong = bl.dispatchWrong();
  col.barrier();
  bl.combine();
  HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
  if (check) res->combine.wrong = bl.combineWrong();

  Events ev(4);
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.setCall("baseline: timed dispatch/combine", i, run.warmup, run.iters);
    const bool timed = i >= run.warmup;
    col.barrier();
    ev.record(0, rd.stream);
    {
      KernelTimerScope k(tm.kernel, tm.ids(res->dispatch, timed));
      bl.dispatch();
    }
    ev.record(1, rd.stream);
    col.barrier();
    ev.record(2, rd.stream);
    {
      KernelTimerScope k(tm.kernel, tm.ids(res->combine, timed));
      bl.combine();
    }
    ev.record(3, rd.stream);
    HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
    if (timed) {
      res->dispatch.us.push_back(ev.us(0, 1));
      res->combine.us.push_back(ev.us(2, 3));
    }
  }
  collectKernelTimes(tm, {&res->dispatch, &res->combine});
  // The count exchange includes a host wait: event-timed, like the MoE notify_dispatch it stands next to.
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.setCall("baseline: timed count exchange + dispatch", i, run.warmup, run.iters);
    col.barrier();
    ev.record(0, rd.stream);
    bl.countExchange();
    bl.dispatch();
    ev.record(1, rd.stream);
    HARNESS_CUDA(cudaStreamSynchronize(rd.stream));
    if (i >= run.warmup) res->first.us.push_back(ev.us(0, 1));
  }
  res->dispatch.available = res->combine.available = res->first.available = true;
}

}  // namespace nccl_moe::perf
