// moe-perf's progress lines on the CPU (perf/progress.h): the rate limiter, the line format, the record a rank
// writes and the printer thread, and the -q/--quiet option that turns them off.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "options.h"
#include "progress.h"

namespace nccl_moe::perf {
namespace {

TEST(PerfProgress, LimiterWaitsThenRateLimits) {
  ProgressLimiter l;  // 3 s, then every 2 s
  EXPECT_FALSE(l.due(0.0));
  EXPECT_FALSE(l.due(2.9));
  EXPECT_TRUE(l.due(3.0));
  EXPECT_FALSE(l.due(3.2));
  EXPECT_FALSE(l.due(4.99));
  EXPECT_TRUE(l.due(5.0));
  EXPECT_FALSE(l.due(6.0));
  EXPECT_TRUE(l.due(30.0));  // a long silent step: the next poll prints at once
  EXPECT_FALSE(l.due(31.9));
  EXPECT_TRUE(l.due(32.0));
}

TEST(PerfProgress, LimiterParameters) {
  ProgressLimiter every(0.0, 0.0);  // every poll
  EXPECT_TRUE(every.due(0.0));
  EXPECT_TRUE(every.due(0.0));
  ProgressLimiter late(10.0, 5.0);
  EXPECT_FALSE(late.due(9.99));
  EXPECT_TRUE(late.due(12.0));
  EXPECT_FALSE(late.due(16.9));
  EXPECT_TRUE(late.due(17.0));
}

TEST(PerfProgress, LineBeforeTheFirstProblem) {
  ProgressSnapshot s;
  s.phase = "ncclCommInitRank";
  EXPECT_EQ(formatProgressLine(s, 3.24), "moe-perf: [    3.2 s] ncclCommInitRank");
}

TEST(PerfProgress, LineOfAnHtLoop) {
  ProgressSnapshot s;
  s.phase = "ht: timed dispatch/combine";
  s.mode = static_cast<int>(Mode::kHt);
  s.dtype = static_cast<int>(DType::kFp8);
  s.sms = 24;
  s.tokens = 4096;
  s.problem_idx = 2;
  s.num_problems = 3;
  s.problem_s = 4.06;
  s.warmup = 5;
  s.iters = 20;
  s.call = 11;  // the 7th timed call
  EXPECT_EQ(formatProgressLine(s, 125.04),
            "moe-perf: [  125.0 s] ht fp8, 4096 tokens, sms 24 (problem 2/3, 4.1 s): ht: timed dispatch/combine, "
            "timed call 7/20");
  s.call = 0;
  EXPECT_NE(formatProgressLine(s, 1).find("dispatch/combine, warm-up call 1/5"), std::string::npos);
  s.call = 4;
  EXPECT_NE(formatProgressLine(s, 1).find("warm-up call 5/5"), std::string::npos);
  s.call = 5;
  EXPECT_NE(formatProgressLine(s, 1).find("timed call 1/20"), std::string::npos);
  s.sms = 0;
  EXPECT_NE(formatProgressLine(s, 1).find("4096 tokens, sms auto (problem"), std::string::npos);
}

TEST(PerfProgress, LineOfAnLlStepWithoutCalls) {
  ProgressSnapshot s;
  s.phase = "building the problem (CPU reference)";
  s.mode = static_cast<int>(Mode::kLl);
  s.dtype = static_cast<int>(DType::kBf16);
  s.tokens = 128;
  s.problem_idx = 1;
  s.num_problems = 1;
  const std::string line = formatProgressLine(s, 9.0);
  EXPECT_EQ(line,
            "moe-perf: [    9.0 s] ll bf16, 128 tokens (problem 1/1, 0.0 s): building the problem (CPU reference)");
  EXPECT_EQ(line.find("sms"), std::string::npos);
  EXPECT_EQ(line.find("call"), std::string::npos);
}

TEST(PerfProgress, RecordAndSnapshot) {
  Progress p;
  EXPECT_STREQ(p.snapshot(nowNs()).phase, "starting");
  EXPECT_EQ(p.snapshot(nowNs()).mode, -1);
  p.enterProblem(Mode::kHt, DType::kBf16, 512, 1, 4);
  p.setSms(48);
  p.setCall("ht: timed dispatch/combine", 3, 1, 3);
  const int64_t t0 = p.problem_start_ns.load();
  ProgressSnapshot s = p.snapshot(t0 + 2500000000LL);
  EXPECT_STREQ(s.phase, "ht: timed dispatch/combine");
  EXPECT_EQ(s.mode, static_cast<int>(Mode::kHt));
  EXPECT_EQ(s.tokens, 512);
  EXPECT_EQ(s.sms, 48);
  EXPECT_EQ(s.problem_idx, 1);
  EXPECT_EQ(s.num_problems, 4);
  EXPECT_DOUBLE_EQ(s.problem_s, 2.5);
  EXPECT_EQ(s.call, 3);
  EXPECT_EQ(s.warmup, 1);
  EXPECT_EQ(s.iters, 3);
  EXPECT_GT(p.last_ns.load(), 0);
  // A step without calls clears the loop; a new problem clears the SM budget.
  p.set("end of size");
  s = p.snapshot(t0);
  EXPECT_EQ(s.iters, 0);
  EXPECT_EQ(formatProgressLine(s, 1).find("call"), std::string::npos);
  p.enterProblem(Mode::kLl, DType::kFp8, 128, 2, 4);
  EXPECT_EQ(p.snapshot(nowNs()).sms, -1);
}

TEST(PerfProgress, CountProblems) {
  Options o;
  std::string err;
  ASSERT_TRUE(parseOptions({}, &o, &err)) << err;
  EXPECT_EQ(countProblems(o), 2);  // HT 4096 bf16, LL 128 fp8
  ASSERT_TRUE(
      parseOptions({"--mode", "ht", "--dtype", "bf16,fp8", "-b", "128", "-e", "512", "--sms", "24,48"}, &o, &err))
      << err;
  EXPECT_EQ(countProblems(o), 6);  // 2 dtypes x 3 sizes; SM budgets are runs of one problem
  ASSERT_TRUE(parseOptions({"--mode", "all", "-b", "1", "-e", "8", "-f", "8"}, &o, &err)) << err;
  EXPECT_EQ(countProblems(o), 4);
}

// What the printer wrote to a temporary file.
std::string readAll(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string text;
  char buf[256];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, n);
  return text;
}

TEST(PerfProgress, PrinterWritesLinesWhenDue) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  Progress p;
  p.enterProblem(Mode::kLl, DType::kFp8, 128, 1, 1);
  p.setCall("ll: timed dispatch/combine", 2, 1, 3);
  {
    ProgressPrinter printer(p, ProgressLimiter(0.0, 0.0), f);
    std::this_thread::sleep_for(std::chrono::milliseconds(700));
  }
  const std::string text = readAll(f);
  std::fclose(f);
  EXPECT_NE(text.find("moe-perf: ["), std::string::npos) << text;
  EXPECT_NE(text.find("ll fp8, 128 tokens (problem 1/1, "), std::string::npos) << text;
  EXPECT_NE(text.find("ll: timed dispatch/combine, timed call 2/3\n"), std::string::npos) << text;
}

TEST(PerfProgress, PrinterIsSilentOnShortRuns) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  Progress p;
  {
    ProgressPrinter printer(p, ProgressLimiter(), f);  // the first line only after 3 s
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  }  // stops promptly, without waiting for its next poll
  EXPECT_EQ(readAll(f), "");
  std::fclose(f);
}

TEST(PerfProgress, QuietOption) {
  Options o;
  std::string err;
  ASSERT_TRUE(parseOptions({}, &o, &err)) << err;
  EXPECT_FALSE(o.quiet);
  ASSERT_TRUE(parseOptions({"-q"}, &o, &err)) << err;
  EXPECT_TRUE(o.quiet);
  ASSERT_TRUE(parseOptions({"--quiet", "--mode", "ll"}, &o, &err)) << err;
  EXPECT_TRUE(o.quiet);
  EXPECT_FALSE(parseOptions({"--quiet=1"}, &o, &err));
  EXPECT_NE(err.find("takes no value"), std::string::npos) << err;
  EXPECT_FALSE(parseOptions({"-q1"}, &o, &err));
  EXPECT_NE(usageText().find("-q, --quiet"), std::string::npos);
}

}  // namespace
}  // namespace nccl_moe::perf
