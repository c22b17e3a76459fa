// What the timed runs of one GPU rank share, and their entry points: the per-rank result of one op, CUDA events, the
// kernel timer's collection after a timed loop, the timed dispatch-then-combine loop of HT and LL, the loops of the
// comparable metrics (--metrics) and the three runs (gpu_baseline_run.cc, gpu_ht.cc, gpu_ll.cc). The progress
// record the watchdog and the progress lines read is progress.h.
//
// Lockstep rule: every rank executes the same sequence of collectives (barriers, agreements, reductions). A rank
// whose MoE call failed keeps taking part in every barrier of a timed loop and skips only the MoE calls;
// availability is then agreed over all ranks (Collective::agree), so control flow never diverges between ranks.
//
// Timing: CUDA events around every timed call; with the kernel timer (--timer kernel, the default when CUPTI works)
// each timed call is also bracketed by a CUPTI external-correlation id (kernel_timer.h) and the row reports the
// kernel spans, with the event median next to it. After each timed loop every rank thread of the process drains its
// stream and meets the others at a host barrier before the CUPTI buffers are flushed (collectKernelTimes).
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "collective.h"
#include "gpu_session.h"
#include "harness/barrier.h"
#include "kernel_timer.h"
#include "metrics.h"
#include "problem.h"
#include "progress.h"
#include "rank_device.h"
#include "run_common.h"

namespace nccl_moe::perf {

// The result of one op on one rank for one size (reduced over ranks by gpu_aggregate.h).
struct OpResult {
  bool available = false;
  std::string error;
  std::vector<double> us;  // CUDA-event time of each timed call
  int64_t wrong = 0;
  // Kernel timer: one id per timed call (bracketed with push/pop), their spans once collected (-1 = no record).
  std::vector<uint64_t> kernel_ids;
  std::vector<double> kernel_us;
  std::string kernel_error;  // why kernel_us is not usable ("" when it is)
  RankMetrics metrics;       // --metrics (timeComparableMetrics); empty when not measured
  bool kernelComplete() const {
    return kernel_error.empty() && !kernel_us.empty() && kernel_us.size() == us.size() &&
           std::all_of(kernel_us.begin(), kernel_us.end(), [](double v) { return v >= 0; });
  }
  void fail(const std::string& e) {
    available = false;
    if (error.empty()) error = e.empty() ? kOtherRank : e;
  }
};

class Events {
 public:
  explicit Events(int n) : ev_(static_cast<size_t>(n)) {
    for (auto& e : ev_) HARNESS_CUDA(cudaEventCreate(&e));
  }
  ~Events() {
    for (auto& e : ev_) cudaEventDestroy(e);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  void record(int i, cudaStream_t s) { HARNESS_CUDA(cudaEventRecord(ev_[static_cast<size_t>(i)], s)); }
  double us(int a, int b) const {
    float ms = 0;
    HARNESS_CUDA(cudaEventElapsedTime(&ms, ev_[static_cast<size_t>(a)], ev_[static_cast<size_t>(b)]));
    return static_cast<double>(ms) * 1e3;
  }

 private:
  std::vector<cudaEvent_t> ev_;
};

struct Timing {
  KernelTimer* kernel = nullptr;          // null: CUDA events only
  harness::HostBarrier* local = nullptr;  // the rank threads of this process
  double local_wait_s = 0;                // bound of a wait at `local`
  // Where a timed call's kernel-timer id goes: null (no bracketing) for warm-up calls and without the kernel timer.
  std::vector<uint64_t>* ids(OpResult& op, bool timed) const {
    return kernel != nullptr && timed ? &op.kernel_ids : nullptr;
  }
};

// Called by every rank thread of the process at the same point, after a timed loop whose last iteration drained the
// rank's stream: once all local ranks are at the barrier no timed kernel runs in the process, so the forced flush
// delivers complete records only; the second barrier keeps every thread from starting timed work while another
// one still flushes. Fills each op's kernel_us (or kernel_error).
void collectKernelTimes(const Timing& t, std::initializer_list<OpResult*> ops);

// The timed dispatch-then-combine loop of HT and LL: a barrier before each call, CUDA events around it and a
// kernel-timer id on the timed (non-warm-up) calls. `dispatch` / `combine` issue one call and return false with
// the error in *err. A rank whose call failed skips that op from then on but keeps taking part in every barrier;
// availability is agreed over all ranks after the loop. The combine is timed only when it is available.
template <typename Dispatch, typename Combine>
void timeDispatchCombine(Collective& col, cudaStream_t st, const RunInfo& run, const Timing& tm, Progress& prog,
                         const char* label, OpResult* d, OpResult* c, Dispatch dispatch, Combine combine) {
  Events ev(4);
  const bool with_combine = c->available;
  bool fail_d = false, fail_c = false;
  std::string ed, ec;
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.setCall(label, i, run.warmup, run.iters);
    const bool timed = i >= run.warmup;
    col.barrier();
    ev.record(0, st);
    if (!fail_d) {
      KernelTimerScope k(tm.kernel, tm.ids(*d, timed));
      fail_d = !dispatch(&ed);
    }
    ev.record(1, st);
    if (with_combine) {
      col.barrier();
      ev.record(2, st);
      if (!fail_c && !fail_d) {
        KernelTimerScope k(tm.kernel, tm.ids(*c, timed));
        fail_c = !combine(&ec);
      }
      ev.record(3, st);
    }
    HARNESS_CUDA(cudaStreamSynchronize(st));
    if (timed) {
      d->us.push_back(ev.us(0, 1));
      if (with_combine) c->us.push_back(ev.us(2, 3));
    }
  }
  collectKernelTimes(tm, {d, c});
  if (!col.agree(!fail_d)) d->fail(ed);
  if (with_combine && !col.agree(!fail_c && !fail_d)) c->fail(ec.empty() ? ed : ec);
}

// One MoE call enqueued on the rank's stream (HT or LL dispatch or combine): false with the error in *err.
using EnqueueCall = std::function<bool(std::string* err)>;

// The comparable metrics of --metrics (docs/moe-perf.md, "Comparable metrics"; metrics.h reduces them), measured
// after the default loop (timeDispatchCombine) in loops of their own, with CUDA events only (no kernel-timer ids),
// for a dispatch/combine pair whose two ops are available (agreed; otherwise nothing is measured). Each selected
// metric is one loop of warm-up + timed iterations of `dispatch` then `combine`:
//   boundary  before every call Collective::hostBarrier() (streams drained, hosts past a rendezvous: the GPU is
//             idle, no hold, no gate), then one event pair around the call: the host's enqueue of the call and
//             all its kernels are inside. -> d/c->metrics.boundary_us
//   fresh     before every call the rank's stream drained, then Collective::barrier() (rendezvous, hold, start
//             gate), then one event pair around the call. -> d/c->metrics.fresh_us
//   chained   timeChainedPairs with `warmup` pairs (untimed), then with `iters` pairs. -> pair_period_us of both
// Lockstep: a rank whose call failed skips its calls but takes part in every barrier; after each loop the ranks
// agree, and a failure fails both ops (their metrics are dropped). Nothing is allocated or freed inside a loop.
void timeComparableMetrics(Collective& col, cudaStream_t st, const RunInfo& run, Progress& prog, Mode mode, OpResult* d,
                           OpResult* c, const EnqueueCall& dispatch, const EnqueueCall& combine);

// The chained loop: one Collective::barrier() (rendezvous, hold, start gate), then a CUDA event, `pairs` times
// `dispatch` then `combine` enqueued back to back (no barrier, no host synchronisation, no allocation between them),
// a CUDA event, and the stream drained. Returns the event time / pairs in microseconds, or -1 when *failed (set
// when a call fails on this rank, with the error in *err; a rank that failed before still takes the barrier and
// enqueues nothing). With ranks sharing a GPU every rank enqueues all its pairs after the one host barrier; their
// kernels meet on the device.
double timeChainedPairs(Collective& col, cudaStream_t st, int pairs, const EnqueueCall& dispatch,
                        const EnqueueCall& combine, bool* failed, std::string* err);

// ------------------------------------------------------------------------------------------------
// The runs of one size (all collective over the ranks)
// ------------------------------------------------------------------------------------------------

// NCCL all-to-all baseline (gpu_baseline.h): verification pass, timed dispatch/combine, timed count exchange +
// dispatch.
struct BaselineResult {
  OpResult dispatch, combine, first;
};
void runBaseline(const Problem& p, const RankDevice& rd, Collective& col, const RunInfo& run, const Timing& tm,
                 Progress& prog, BaselineResult* res);

// High-throughput MoE ops: verification pass, timed cached dispatch + combine, timed notify + dispatch.
struct HtResult {
  OpResult dispatch, combine, first;
};
void runMoeHt(const Problem& p, const RankDevice& rd, Collective& col, MoeSession& moe, int sms, const RunInfo& run,
              const Timing& tm, Progress& prog, HtResult* res);

// Low-latency MoE ops: verification passes (both phases per call, then the halves), timed dispatch + combine,
// timed send/receive halves.
struct LlResult {
  OpResult dispatch, combine, dispatch_send, dispatch_recv, combine_send, combine_recv;
};
void runMoeLl(const Problem& p, const RankDevice& rd, Collective& col, MoeSession& moe, const RunInfo& run,
              const Timing& tm, Progress& prog, LlResult* res);

}  // namespace nccl_moe::perf
