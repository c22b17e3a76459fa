// The kernel timer's collection after a timed loop and the loops of the comparable metrics (contracts in
// gpu_run.h).
#include "gpu_run.h"

namespace nccl_moe::perf {

namespace {

// How every call of a comparable-metric loop is entered.
enum class Entry {
  kHostSynchronised,  // common boundary: Collective::hostBarrier(), the GPU idle, no hold, no gate
  kFresh,             // fresh entry: the rank's stream drained, then Collective::barrier() (rendezvous, hold, gate)
};

void enter(Collective& col, cudaStream_t st, Entry entry) {
  if (entry == Entry::kHostSynchronised) {
    col.hostBarrier();
    return;
  }
  HARNESS_CUDA(cudaStreamSynchronize(st));
  col.barrier();
}

// Warm-up + timed iterations of `dispatch` then `combine`, each call entered as `entry` says and bracketed by one
// event pair; the timed calls' times are appended to *d_us and *c_us (one per timed call, also after a failure, so
// every rank has the same count). False with *err when a call failed on this rank (its later calls are skipped).
bool timeEachCall(Collective& col, cudaStream_t st, const RunInfo& run, Progress& prog, const char* label, Entry entry,
                  const EnqueueCall& dispatch, const EnqueueCall& combine, std::vector<double>* d_us,
                  std::vector<double>* c_us, std::string* err) {
  Events ev(4);
  bool failed = false;
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.setCall(label, i, run.warmup, run.iters);
    enter(col, st, entry);
    ev.record(0, st);
    if (!failed) failed = !dispatch(err);
    ev.record(1, st);
    enter(col, st, entry);
    ev.record(2, st);
    if (!failed) failed = !combine(err);
    ev.record(3, st);
    HARNESS_CUDA(cudaStreamSynchronize(st));
    if (i >= run.warmup) {
      d_us->push_back(ev.us(0, 1));
      c_us->push_back(ev.us(2, 3));
    }
  }
  return !failed;
}

// Progress labels (string literals, progress.h) per mode: [0] HT, [1] LL.
const char* const kBoundaryLabel[2] = {"ht: common-boundary calls (--metrics)",
                                       "ll: common-boundary calls (--metrics)"};
const char* const kFreshLabel[2] = {"ht: fresh-entry calls (--metrics)", "ll: fresh-entry calls (--metrics)"};
const char* const kChainWarmupLabel[2] = {"ht: chained pairs, warm-up chain (--metrics)",
                                          "ll: chained pairs, warm-up chain (--metrics)"};
const char* const kChainLabel[2] = {"ht: chained pairs, timed chain (--metrics)",
                                    "ll: chained pairs, timed chain (--metrics)"};

}  // namespace

double timeChainedPairs(Collective& col, cudaStream_t st, int pairs, const EnqueueCall& dispatch,
                        const EnqueueCall& combine, bool* failed, std::string* err) {
  Events ev(2);  // before the barrier: the region between the events creates and frees nothing
  col.barrier();
  ev.record(0, st);
  for (int k = 0; k < pairs && !*failed; ++k) *failed = !dispatch(err) || !combine(err);
  ev.record(1, st);
  HARNESS_CUDA(cudaStreamSynchronize(st));
  return *failed || pairs <= 0 ? -1.0 : ev.us(0, 1) / pairs;
}

void timeComparableMetrics(Collective& col, cudaStream_t st, const RunInfo& run, Progress& prog, Mode mode, OpResult* d,
                           OpResult* c, const EnqueueCall& dispatch, const EnqueueCall& combine) {
  const MetricsChoice& m = run.options.metrics;
  if (!m.any() || !d->available || !c->available) return;  // agreed before: the same decision on every rank
  const int mi = mode == Mode::kHt ? 0 : 1;
  std::string err;
  // After each loop: every rank agrees, or both ops fail (a failed call after the default loop) and lose their metrics.
  auto agreed = [&](bool ok) {
    if (col.agree(ok)) return true;
    d->fail(err);
    c->fail(err);
    d->metrics = RankMetrics();
    c->metrics = RankMetrics();
    return false;
  };
  if (m.boundary && !agreed(timeEachCall(col, st, run, prog, kBoundaryLabel[mi], Entry::kHostSynchronised, dispatch,
                                         combine, &d->metrics.boundary_us, &c->metrics.boundary_us, &err)))
    return;
  if (m.fresh && !agreed(timeEachCall(col, st, run, prog, kFreshLabel[mi], Entry::kFresh, dispatch, combine,
                                      &d->metrics.fresh_us, &c->metrics.fresh_us, &err)))
    return;
  if (m.chained) {
    bool failed = false;
    if (run.warmup > 0) {
      prog.set(kChainWarmupLabel[mi]);
      timeChainedPairs(col, st, run.warmup, dispatch, combine, &failed, &err);
    }
    prog.set(kChainLabel[mi]);
    const double period = timeChainedPairs(col, st, run.iters, dispatch, combine, &failed, &err);
    if (!agreed(!failed)) return;
    d->metrics.pair_period_us = c->metrics.pair_period_us = period;
  }
}

void collectKernelTimes(const Timing& t, std::initializer_list<OpResult*> ops) {
  if (t.kernel == nullptr) {
    for (OpResult* o : ops) o->kernel_error = "the kernel timer is off in this process";
    return;
  }
  meet(*t.local, t.local_wait_s, "before the kernel timer's flush");
  std::vector<uint64_t> ids;
  for (const OpResult* o : ops) ids.insert(ids.end(), o->kernel_ids.begin(), o->kernel_ids.end());
  std::vector<double> spans;
  std::string err;
  t.kernel->collect(ids, &spans, &err);
  size_t at = 0;
  for (OpResult* o : ops) {
    const size_t n = o->kernel_ids.size();
    o->kernel_us.assign(spans.begin() + static_cast<std::ptrdiff_t>(at),
                        spans.begin() + static_cast<std::ptrdiff_t>(at + n));
    at += n;
    const auto missing = std::count_if(o->kernel_us.begin(), o->kernel_us.end(), [](double v) { return v < 0; });
    if (!t.kernel->usable()) {
      o->kernel_error = t.kernel->error();
    } else if (missing > 0) {
      o->kernel_error = "no complete CUPTI kernel record for " + std::to_string(missing) + " of " + std::to_string(n) +
                        " timed calls";
    } else if (n != o->us.size()) {
      o->kernel_error = std::to_string(n) + " kernel-timed calls for " + std::to_string(o->us.size()) + " timed calls";
    }
    o->kernel_ids.clear();
  }
  meet(*t.local, t.local_wait_s, "after the kernel timer's flush");
}

}  // namespace nccl_moe::perf
