// Reduction of the comparable metrics over ranks (contract in metrics.h).
#include "metrics.h"

#include <cmath>
#include <limits>

#include "cpu_baseline.h"  // median()

namespace nccl_moe::perf {

namespace {
constexpr double kNotMeasured = std::numeric_limits<double>::infinity();
size_t sz(int v) { return static_cast<size_t>(v); }
}  // namespace

std::vector<double> metricsMaxTerms(const RankMetrics& m, int calls) {
  std::vector<double> t(2 + sz(calls), kNotMeasured);
  if (!m.boundary_us.empty()) t[0] = median(m.boundary_us);
  if (m.pair_period_us >= 0) t[1] = m.pair_period_us;
  if (calls > 0 && m.fresh_us.size() == sz(calls))
    for (size_t i = 0; i < sz(calls); ++i) t[2 + i] = m.fresh_us[i];
  return t;
}

ReducedMetrics metricsFromMax(const std::vector<double>& max_terms, int calls) {
  ReducedMetrics r;
  if (max_terms.size() != 2 + sz(calls)) return r;
  if (std::isfinite(max_terms[0])) r.common_boundary_us = max_terms[0];
  if (std::isfinite(max_terms[1])) r.chained_pair_period_us = max_terms[1];
  const std::vector<double> slowest(max_terms.begin() + 2, max_terms.end());  // [call]: its slowest rank's time
  bool all = !slowest.empty();
  for (double v : slowest) all = all && std::isfinite(v);
  if (all) r.fresh_p50_us = median(slowest);
  return r;
}

}  // namespace nccl_moe::perf
