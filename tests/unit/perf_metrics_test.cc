// moe-perf's comparable metrics on the CPU: the --metrics option, their reduction over ranks (perf/metrics.h, the
// functions the GPU backend's aggregate() uses, checked against the definitions computed directly from every rank's
// calls), and how rows carry them (JSON keys always present, null when not measured; table columns only when
// selected).
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu_baseline.h"  // median()
#include "metrics.h"
#include "options.h"
#include "report.h"
#include "run_common.h"

namespace nccl_moe::perf {
namespace {

MetricsChoice parsed(const std::string& text) {
  MetricsChoice m;
  std::string err;
  EXPECT_TRUE(parseMetrics(text, &m, &err)) << err;
  return m;
}

TEST(PerfMetrics, Option) {
  Options o;
  std::string err;
  ASSERT_TRUE(parseOptions({}, &o, &err)) << err;
  EXPECT_FALSE(o.metrics.any());
  EXPECT_EQ(metricsText(o.metrics), "default");
  ASSERT_TRUE(parseOptions({"--metrics", "extra"}, &o, &err)) << err;
  EXPECT_TRUE(o.metrics.boundary && o.metrics.fresh && o.metrics.chained);
  EXPECT_EQ(metricsText(o.metrics), "boundary,fresh,chained");
  ASSERT_TRUE(parseOptions({"--metrics=chained,boundary"}, &o, &err)) << err;
  EXPECT_TRUE(o.metrics.boundary && !o.metrics.fresh && o.metrics.chained);
  EXPECT_EQ(metricsText(o.metrics), "boundary,chained");

  EXPECT_EQ(metricsText(parsed("all")), "boundary,fresh,chained");
  EXPECT_EQ(metricsText(parsed("fresh")), "fresh");
  EXPECT_EQ(metricsText(parsed("default")), "default");
  EXPECT_EQ(metricsText(parsed("extra,default,fresh")), "fresh");  // default clears what came before

  for (const char* bad : {"", "boundry", "extra,", "fresh,,chained", "Fresh"}) {
    MetricsChoice m;
    EXPECT_FALSE(parseMetrics(bad, &m, &err)) << bad;
    EXPECT_NE(err.find("--metrics"), std::string::npos) << err;
  }
  EXPECT_FALSE(parseOptions({"--metrics"}, &o, &err));
  EXPECT_NE(err.find("needs a value"), std::string::npos) << err;
  EXPECT_NE(usageText().find("--metrics M[,M]"), std::string::npos);
}

// The definitions of metrics.h, computed directly from every rank's calls.
double slowestMedian(const std::vector<std::vector<double>>& per_rank) {
  double m = 0;
  for (const auto& calls : per_rank) m = std::max(m, median(calls));
  return m;
}
double medianOfSlowestCall(const std::vector<std::vector<double>>& per_rank) {
  std::vector<double> slowest(per_rank[0].size(), 0.0);
  for (const auto& calls : per_rank)
    for (size_t i = 0; i < calls.size(); ++i) slowest[i] = std::max(slowest[i], calls[i]);
  return median(slowest);
}

// What aggregate() does: every rank's terms, their element-wise maximum, then the row's values.
ReducedMetrics reduce(const std::vector<RankMetrics>& ranks, int calls) {
  std::vector<double> max_terms;
  for (const RankMetrics& r : ranks) {
    const std::vector<double> t = metricsMaxTerms(r, calls);
    EXPECT_EQ(t.size(), 2 + static_cast<size_t>(calls));  // the same length on every rank
    if (max_terms.empty()) {
      max_terms = t;
    } else {
      for (size_t i = 0; i < t.size(); ++i) max_terms[i] = std::max(max_terms[i], t[i]);
    }
  }
  return metricsFromMax(max_terms, calls);
}

TEST(PerfMetrics, ReductionMatchesTheDefinitions) {
  // 3 ranks, 5 calls. Each rank is slowest on different calls, so the median of the per-call maxima (fresh) differs
  // from the maximum of the per-rank medians (boundary's statistic).
  const std::vector<std::vector<double>> fresh = {{10, 30, 10, 10, 10}, {10, 10, 30, 10, 11}, {30, 10, 10, 30, 10}};
  const std::vector<std::vector<double>> boundary = {{5, 6, 7, 8, 100}, {9, 9, 9, 9, 9}, {1, 2, 3, 4, 5}};
  std::vector<RankMetrics> ranks(3);
  const double periods[3] = {21.5, 23.25, 22.0};
  for (size_t r = 0; r < 3; ++r) {
    ranks[r].fresh_us = fresh[r];
    ranks[r].boundary_us = boundary[r];
    ranks[r].pair_period_us = periods[r];
  }
  const ReducedMetrics m = reduce(ranks, 5);
  EXPECT_DOUBLE_EQ(m.common_boundary_us, slowestMedian(boundary));
  EXPECT_DOUBLE_EQ(m.common_boundary_us, 9.0);  // rank 1's median; rank 0's one slow call does not count
  EXPECT_DOUBLE_EQ(m.fresh_p50_us, medianOfSlowestCall(fresh));
  EXPECT_DOUBLE_EQ(m.fresh_p50_us, 30.0);        // per call: 30 30 30 30 11
  EXPECT_DOUBLE_EQ(slowestMedian(fresh), 10.0);  // what the default statistic would have said
  EXPECT_DOUBLE_EQ(m.chained_pair_period_us, 23.25);
}

TEST(PerfMetrics, EvenCallCountsAndOneRank) {
  std::vector<RankMetrics> one(1);
  one[0].fresh_us = {4, 1, 3, 2};
  one[0].boundary_us = {8, 2, 6, 4};
  const ReducedMetrics m = reduce(one, 4);
  EXPECT_DOUBLE_EQ(m.fresh_p50_us, 2.5);  // the mean of the two middle values
  EXPECT_DOUBLE_EQ(m.common_boundary_us, 5.0);
  EXPECT_LT(m.chained_pair_period_us, 0);  // not measured
}

TEST(PerfMetrics, NotMeasuredUnlessEveryRankMeasured) {
  // Nothing selected: every value null.
  const ReducedMetrics none = reduce(std::vector<RankMetrics>(4), 20);
  EXPECT_LT(none.common_boundary_us, 0);
  EXPECT_LT(none.fresh_p50_us, 0);
  EXPECT_LT(none.chained_pair_period_us, 0);
  // One rank lacks a value: the slowest rank is unknown, so the value is null.
  std::vector<RankMetrics> ranks(2);
  ranks[0].boundary_us = {1, 2, 3};
  ranks[0].fresh_us = {1, 2, 3};
  ranks[0].pair_period_us = 7;
  ranks[1].fresh_us = {1, 2};  // not one value per timed call
  const ReducedMetrics m = reduce(ranks, 3);
  EXPECT_LT(m.common_boundary_us, 0);
  EXPECT_LT(m.fresh_p50_us, 0);
  EXPECT_LT(m.chained_pair_period_us, 0);
  // Terms of the wrong length (a caller bug) give nothing rather than a wrong value.
  EXPECT_LT(metricsFromMax({1, 2, 3}, 5).fresh_p50_us, 0);
  EXPECT_LT(metricsFromMax({1, 2, 3}, 5).common_boundary_us, 0);
}

ResultRow gpuRow() {
  ResultRow r;
  r.mode = Mode::kLl;
  r.op = "dispatch";
  r.dtype = DType::kFp8;
  r.ranks = r.gpus = 2;
  r.tokens = 128;
  r.hidden = 7168;
  r.topk = 8;
  r.experts = 288;
  r.available = true;
  r.median_us = 100;
  r.bytes_per_rank = 1e6;
  r.checked = true;
  return r;
}

TEST(PerfMetrics, JsonKeysAlwaysPresentNullWhenNotMeasured) {
  ResultRow r = gpuRow();
  std::string j = toJson(r);
  for (const char* key : {"\"common_boundary_us\":null", "\"fresh_p50_us\":null", "\"chained_pair_period_us\":null"})
    EXPECT_NE(j.find(key), std::string::npos) << key << " in " << j;
  r.metrics.common_boundary_us = 31.5;
  r.metrics.fresh_p50_us = 29.25;
  r.metrics.chained_pair_period_us = 55.125;
  j = toJson(r);
  for (const char* key :
       {"\"common_boundary_us\":31.500", "\"fresh_p50_us\":29.250", "\"chained_pair_period_us\":55.125"})
    EXPECT_NE(j.find(key), std::string::npos) << key << " in " << j;
  // Between timer_note and checked, after the default timings.
  EXPECT_LT(j.find("\"timer_note\""), j.find("\"common_boundary_us\""));
  EXPECT_LT(j.find("\"chained_pair_period_us\""), j.find("\"checked\""));
  // An op that is not available has none.
  r.available = false;
  r.error = "failed";
  j = toJson(r);
  for (const char* key : {"\"common_boundary_us\":null", "\"fresh_p50_us\":null", "\"chained_pair_period_us\":null"})
    EXPECT_NE(j.find(key), std::string::npos) << key << " in " << j;
}

TEST(PerfMetrics, TableColumnsOnlyWhenSelected) {
  ResultRow r = gpuRow();
  r.metrics.common_boundary_us = 31.5;
  r.metrics.chained_pair_period_us = 55.25;
  // Default: the table of before (no column, no value).
  EXPECT_EQ(tableHeader(), tableHeader(MetricsChoice()));
  EXPECT_EQ(tableHeader().find("boundary"), std::string::npos);
  EXPECT_NE(tableHeader().find("bl#wrong\n"), std::string::npos);
  EXPECT_EQ(tableRow(r).find("31.50"), std::string::npos);
  EXPECT_EQ(tableRow(r), tableRow(r, MetricsChoice()));
  // Selected: a column each, in the order boundary, fresh, chained; "-" where the row has no value.
  const MetricsChoice all = parsed("extra");
  const std::string h = tableHeader(all);
  EXPECT_NE(h.find("bl#wrong    boundary_us   fresh_p50_us pair_period_us\n"), std::string::npos) << h;
  const std::string t = tableRow(r, all);
  EXPECT_NE(t.find("          31.50              -          55.25"), std::string::npos) << t;
  EXPECT_EQ(t.size() - tableRow(r).size(), h.size() - tableHeader().size());  // columns line up with the titles
  const std::string only = tableRow(r, parsed("fresh"));
  EXPECT_EQ(only, tableRow(r).substr(0, tableRow(r).size() - 1) + "              -\n") << only;  // one column
  EXPECT_EQ(only.find("31.50"), std::string::npos) << only;
  // Markers stay at the end of the line.
  r.available = false;
  r.error = "failed";
  const std::string na = tableRow(r, all);
  EXPECT_LT(na.rfind(" -  not available: failed"), na.size()) << na;
}

TEST(PerfMetrics, NotesUnderTheTable) {
  testing::internal::CaptureStdout();
  printMetricsNotes(parsed("extra"), false);
  const std::string gpu = testing::internal::GetCapturedStdout();
  for (const char* text : {"--metrics boundary,fresh,chained", "boundary_us = common-boundary time",
                           "fresh_p50_us = fresh-entry p50", "pair_period_us = chained pair period"})
    EXPECT_NE(gpu.find(text), std::string::npos) << text << " in " << gpu;
  size_t start = 0;
  while (start < gpu.size()) {  // comment lines of at most 120 columns
    const size_t end = gpu.find('\n', start);
    ASSERT_NE(end, std::string::npos);
    EXPECT_EQ(gpu[start], '#');
    EXPECT_LE(end - start, 120u) << gpu.substr(start, end - start);
    start = end + 1;
  }
  testing::internal::CaptureStdout();
  printMetricsNotes(parsed("chained"), false);
  const std::string one = testing::internal::GetCapturedStdout();
  EXPECT_EQ(one.find("boundary_us ="), std::string::npos) << one;
  EXPECT_NE(one.find("pair_period_us ="), std::string::npos) << one;
  testing::internal::CaptureStdout();
  printMetricsNotes(parsed("fresh"), true);
  EXPECT_NE(testing::internal::GetCapturedStdout().find("GPU backend only"), std::string::npos);
}

}  // namespace
}  // namespace nccl_moe::perf
