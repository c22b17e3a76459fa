// Reduction of per-rank results over ranks and the rows made from them (contract in gpu_aggregate.h).
#include "gpu_aggregate.h"

#include <algorithm>
#include <cstring>

#include "cpu_baseline.h"  // median()

namespace nccl_moe::perf {

namespace {
size_t sz(int64_t v) { return static_cast<size_t>(v); }
}  // namespace

std::vector<Aggregate> aggregate(Collective& col, const std::vector<const OpResult*>& ops, int num_ranks,
                                 int metric_calls) {
  const size_t n = ops.size();
  std::vector<double> mins(2 * n), maxs(6 * n), sums(n);
  auto stats = [&](const std::vector<double>& us, bool have, size_t at) {
    maxs[at] = have ? median(us) : 0.0;
    maxs[n + at] = have ? *std::max_element(us.begin(), us.end()) : 0.0;
    maxs[2 * n + at] = have ? -*std::min_element(us.begin(), us.end()) : -1e300;
  };
  for (size_t i = 0; i < n; ++i) {
    const OpResult& o = *ops[i];
    const bool have = o.available && !o.us.empty();
    const bool have_kernel = have && o.kernelComplete();
    mins[i] = have ? 1.0 : 0.0;
    mins[n + i] = have_kernel ? 1.0 : 0.0;
    stats(o.us, have, i);
    stats(o.kernel_us, have_kernel, 3 * n + i);
    sums[i] = static_cast<double>(o.wrong);
  }
  mins = col.allReduce(mins, ReduceOp::kMin);
  maxs = col.allReduce(maxs, ReduceOp::kMax);
  sums = col.allReduce(sums, ReduceOp::kSum);
  // Per rank and op: the error text, then the kernel timer's.
  constexpr size_t kText = 256;
  std::vector<char> mine(2 * n * kText, '\0');
  for (size_t i = 0; i < n; ++i) {
    std::strncpy(&mine[i * kText], ops[i]->error.c_str(), kText - 1);
    std::strncpy(&mine[(n + i) * kText], ops[i]->kernel_error.c_str(), kText - 1);
  }
  const std::vector<char> all = col.allGather(mine);
  std::vector<Aggregate> out(n);
  for (size_t i = 0; i < n; ++i) {
    Aggregate& a = out[i];
    a.available = mins[i] > 0.5;
    a.median_us = maxs[i];
    a.max_us = maxs[n + i];
    a.min_us = -maxs[2 * n + i];
    a.kernel = mins[n + i] > 0.5;
    a.kernel_median_us = maxs[3 * n + i];
    a.kernel_max_us = maxs[4 * n + i];
    a.kernel_min_us = -maxs[5 * n + i];
    a.wrong = static_cast<int64_t>(sums[i]);
    for (int r = 0; r < num_ranks && !a.available; ++r) {
      const std::string e(&all[(sz(r) * 2 * n + i) * kText]);
      if (!e.empty() && (a.error.empty() || a.error == kOtherRank)) a.error = e;
    }
    for (int r = 0; r < num_ranks && !a.kernel && a.kernel_error.empty(); ++r) {
      const std::string e(&all[(sz(r) * 2 * n + n + i) * kText]);
      if (!e.empty()) a.kernel_error = "rank " + std::to_string(r) + ": " + e;
    }
    if (!a.available && a.error.empty()) a.error = "no timed calls";
  }
  if (metric_calls > 0) {  // one element-wise maximum of every op's terms (metrics.h)
    const size_t per_op = metricsMaxTerms(RankMetrics(), metric_calls).size();
    std::vector<double> terms;
    for (const OpResult* o : ops) {
      const std::vector<double> t = metricsMaxTerms(o->metrics, metric_calls);
      terms.insert(terms.end(), t.begin(), t.end());
    }
    terms = col.allReduce(terms, ReduceOp::kMax);
    for (size_t i = 0; i < n; ++i)
      out[i].metrics =
          metricsFromMax(std::vector<double>(terms.begin() + static_cast<std::ptrdiff_t>(i * per_op),
                                             terms.begin() + static_cast<std::ptrdiff_t>((i + 1) * per_op)),
                         metric_calls);
  }
  return out;
}

void fillRow(ResultRow* row, const Aggregate& moe, const Aggregate* baseline, bool kernel_timed) {
  const bool moe_kernel = !moe.available || moe.kernel;
  const bool baseline_kernel = baseline == nullptr || baseline->kernel;
  const bool kernel = kernel_timed && moe_kernel && baseline_kernel && (moe.available || baseline != nullptr);
  row->available = moe.available;
  row->error = moe.error;
  row->timer = kernel ? "kernel" : "event";
  row->median_us = kernel ? moe.kernel_median_us : moe.median_us;
  row->min_us = kernel ? moe.kernel_min_us : moe.min_us;
  row->max_us = kernel ? moe.kernel_max_us : moe.max_us;
  row->event_median_us = moe.median_us;
  row->metrics = moe.metrics;
  row->wrong = moe.wrong;
  if (baseline != nullptr) {
    row->has_baseline = true;
    row->baseline_median_us = kernel ? baseline->kernel_median_us : baseline->median_us;
    row->baseline_event_median_us = baseline->median_us;
    row->baseline_wrong = baseline->wrong;
  }
  if (kernel_timed && !kernel) {
    if (!moe_kernel) {
      row->timer_note = moe.kernel_error.empty() ? "no kernel spans" : moe.kernel_error;
    } else if (!baseline_kernel) {
      row->timer_note = "baseline: " + (baseline->kernel_error.empty() ? "no kernel spans" : baseline->kernel_error);
    }
  }
}

}  // namespace nccl_moe::perf
