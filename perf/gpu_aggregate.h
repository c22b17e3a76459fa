// Per-rank results of one op reduced over all ranks (a collective), and a result row filled from them: the row's
// MoE numbers and its baseline's use the same timer (kernel spans when both have them on every rank, else CUDA
// events for both, with the reason in timer_note).
#pragma once

#include <string>
#include <vector>

#include "collective.h"
#include "gpu_run.h"
#include "report.h"

namespace nccl_moe::perf {

struct Aggregate {
  bool available = false;
  std::string error;
  double median_us = 0, min_us = 0, max_us = 0;  // CUDA events
  int64_t wrong = 0;
  // Kernel timer: every rank has a complete kernel span for every timed call.
  bool kernel = false;
  double kernel_median_us = 0, kernel_min_us = 0, kernel_max_us = 0;
  std::string kernel_error;  // why not (first rank with a reason), when the kernel timer was used
  ReducedMetrics metrics;    // --metrics (metrics.h); < 0 = not measured
};

// Reduces per-rank results over all ranks: available = all ranks, median = max of the per-rank medians,
// min/max over every call of every rank, wrong = sum; the error text of the first rank that had its own. The same
// for the kernel spans (kernel = all ranks have them). `metric_calls` > 0 (the timed calls per loop, with --metrics;
// the same on every rank) also reduces the comparable metrics (metrics.h); 0 leaves them unmeasured and makes no
// extra collective call.
std::vector<Aggregate> aggregate(Collective& col, const std::vector<const OpResult*>& ops, int num_ranks,
                                 int metric_calls = 0);

// `kernel_timed`: the kernel timer is on and the op is one it times (not notify_dispatch). The MoE op and its
// baseline are reported with the same timer: kernel spans when both have them on every rank, else CUDA events for
// both, with the reason in timer_note. event_median_us keeps the CUDA-event medians either way. `baseline` may be
// null (no baseline for the op). The comparable metrics are copied from `moe`.
void fillRow(ResultRow* row, const Aggregate& moe, const Aggregate* baseline, bool kernel_timed);

}  // namespace nccl_moe::perf
