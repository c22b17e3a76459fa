// The comparable metrics of --metrics (docs/moe-perf.md, "Comparable metrics"): one rank's measurements of one op
// and their reduction over ranks into the row's values. Pure host code, unit-tested (tests/unit/perf_metrics_test.cc);
// the GPU backend measures (gpu_run.h, timeComparableMetrics) and reduces (gpu_aggregate.cc) with these.
//
// Contract
//   - The reduction over ranks is one element-wise maximum: every rank contributes metricsMaxTerms() (the same
//     length on every rank for a given number of timed calls), the maximum over ranks goes into metricsFromMax().
//     A value a rank did not measure is +infinity in its terms, so the result is "not measured" (< 0, null in JSON)
//     unless every rank measured it.
//   - common_boundary_us = max over ranks of the rank's median boundary time (the slowest rank's median).
//   - fresh_p50_us = median over the timed calls i of (max over ranks of call i's time): the p50 of the call as a
//     collective (a call is over when its slowest rank is). Calls are matched by index: every rank times the same
//     number of calls in lockstep.
//   - chained_pair_period_us = max over ranks of the rank's (event time of the chained loop) / (pairs in it).
#pragma once

#include <vector>

namespace nccl_moe::perf {

// One rank's measurements of one op; empty / < 0 = not measured.
struct RankMetrics {
  std::vector<double> boundary_us;  // one per timed call
  std::vector<double> fresh_us;     // one per timed call
  double pair_period_us = -1;       // chained loop: event time / pairs (the same on a pair's dispatch and combine)
};

// The row's values; < 0 = not measured (null in JSON).
struct ReducedMetrics {
  double common_boundary_us = -1;
  double fresh_p50_us = -1;
  double chained_pair_period_us = -1;
};

// [boundary median, pair period, fresh call 0 .. calls-1]: 2 + calls values (+infinity where not measured; the fresh
// calls are +infinity unless fresh_us has exactly `calls` values).
std::vector<double> metricsMaxTerms(const RankMetrics& m, int calls);
// The row's values from the element-wise maximum over ranks of metricsMaxTerms(..., calls).
ReducedMetrics metricsFromMax(const std::vector<double>& max_terms, int calls);

}  // namespace nccl_moe::perf
