// moe-perf's pure parts on the CPU: option parsing and defaults, token sweeps, shape checks, byte accounting, the
// rank layout (ranks sharing a GPU: validation and device mapping), output formatting (honest labels: ranks, gpus,
// shared_gpu), and the baseline index plans + verification (the CPU baseline must reproduce the reference bit for
// bit, and the checks must catch corrupted or reordered rows).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_baseline.h"
#include "launcher.h"
#include "options.h"
#include "plan.h"
#include "problem.h"
#include "report.h"
#include "run_common.h"
#include "verify.h"

namespace nccl_moe::perf {
namespace {

Options parse(const std::vector<std::string>& args) {
  Options o;
  std::string err;
  EXPECT_TRUE(parseOptions(args, &o, &err)) << err;
  return o;
}

std::string parseError(const std::vector<std::string>& args) {
  Options o;
  std::string err;
  EXPECT_FALSE(parseOptions(args, &o, &err));
  return err;
}

TEST(PerfOptions, DefaultsPerMode) {
  const Options o = parse({});
  EXPECT_EQ(resolveModes(o), (std::vector<Mode>{Mode::kHt, Mode::kLl}));
  EXPECT_EQ(o.check, 1);
  EXPECT_EQ(o.iters, -1);
  EXPECT_EQ(o.routing.text, "uniform");
  const ModeConfig ht = resolveMode(o, Mode::kHt);
  EXPECT_EQ(ht.tokens, (std::vector<int64_t>{4096}));
  EXPECT_EQ(ht.hidden, 7168);
  EXPECT_EQ(ht.topk, 8);
  EXPECT_EQ(ht.experts, 256);
  EXPECT_EQ(ht.dtypes, (std::vector<DType>{DType::kBf16}));
  const ModeConfig ll = resolveMode(o, Mode::kLl);
  EXPECT_EQ(ll.tokens, (std::vector<int64_t>{128}));
  EXPECT_EQ(ll.hidden, 7168);
  EXPECT_EQ(ll.topk, 8);
  EXPECT_EQ(ll.experts, 288);
  EXPECT_EQ(ll.dtypes, (std::vector<DType>{DType::kFp8}));
}

TEST(PerfOptions, NcclTestsLetters) {
  const Options o = parse(
      {"-b", "128", "-e", "1K", "-f", "4", "-n", "7", "-w", "2", "-c", "0", "-t", "2", "-g", "4", "-J", "x.json"});
  EXPECT_EQ(o.min_tokens, 128);
  EXPECT_EQ(o.max_tokens, 1024);
  EXPECT_DOUBLE_EQ(o.step_factor, 4.0);
  EXPECT_EQ(o.iters, 7);
  EXPECT_EQ(o.warmup, 2);
  EXPECT_EQ(o.check, 0);
  EXPECT_EQ(o.threads, 2);
  EXPECT_EQ(o.gpus, 4);
  EXPECT_EQ(o.json_path, "x.json");
  EXPECT_EQ(resolveMode(o, Mode::kHt).tokens, (std::vector<int64_t>{128, 512}));
  const Options inl = parse({"-b64", "-e256", "-n3"});
  EXPECT_EQ(inl.min_tokens, 64);
  EXPECT_EQ(inl.max_tokens, 256);
  EXPECT_EQ(inl.iters, 3);
}

TEST(PerfOptions, UnavailableMoeOpsFailTheRunUnlessAllowed) {
  EXPECT_TRUE(parse({}).require_moe);
  EXPECT_TRUE(parse({"--require-moe"}).require_moe);
  EXPECT_FALSE(parse({"--allow-missing-moe"}).require_moe);
}

TEST(PerfOptions, LongOptions) {
  const Options o = parse({"--mode",
                           "ll",
                           "--tokens=512",
                           "--hidden",
                           "4096",
                           "--topk",
                           "6",
                           "--experts",
                           "64",
                           "--dtype",
                           "bf16,fp8",
                           "--sms",
                           "24,48",
                           "--routing",
                           "skewed:2,masked:0.25",
                           "--seed",
                           "42",
                           "--procs",
                           "2",
                           "--cpu",
                           "--json=out.jsonl",
                           "--require-moe",
                           "--alignment",
                           "128"});
  EXPECT_EQ(o.modes, (std::vector<Mode>{Mode::kLl}));
  EXPECT_EQ(o.min_tokens, 512);
  EXPECT_EQ(o.max_tokens, 512);
  EXPECT_EQ(o.hidden, 4096);
  EXPECT_EQ(o.topk, 6);
  EXPECT_EQ(o.experts, 64);
  EXPECT_EQ(o.dtypes, (std::vector<DType>{DType::kBf16, DType::kFp8}));
  EXPECT_EQ(o.sms, (std::vector<int>{24, 48}));
  EXPECT_DOUBLE_EQ(o.routing.skew, 2.0);
  EXPECT_DOUBLE_EQ(o.routing.masked_fraction, 0.25);
  EXPECT_EQ(o.routing.text, "skewed:2,masked:0.25");
  EXPECT_EQ(o.seed, 42u);
  EXPECT_EQ(o.procs, 2);
  EXPECT_TRUE(o.cpu);
  EXPECT_TRUE(o.require_moe);
  EXPECT_EQ(o.json_path, "out.jsonl");
  EXPECT_EQ(o.expert_alignment, 128);
  // LL ignores the HT SM list (its budget is --ll-sms, one per communicator); HT sweeps it.
  EXPECT_EQ(resolveMode(o, Mode::kLl).sms, (std::vector<int>{0}));
  EXPECT_EQ(resolveMode(o, Mode::kHt).sms, (std::vector<int>{24, 48}));
  const Options b = parse({"--mode", "ll", "--ll-sms", "24", "--sms", "16"});
  EXPECT_EQ(b.ll_sms, 24);
  EXPECT_EQ(resolveMode(b, Mode::kLl).sms, (std::vector<int>{24}));
  EXPECT_EQ(resolveMode(b, Mode::kHt).sms, (std::vector<int>{16}));
  EXPECT_EQ(parse({"--mode", "all"}).modes, (std::vector<Mode>{Mode::kHt, Mode::kLl}));
  EXPECT_TRUE(parse({"-h"}).help);
}

TEST(PerfOptions, Timer) {
  EXPECT_EQ(parse({}).timer, TimerChoice::kAuto);  // kernel when the CUPTI kernel timer works, else event
  EXPECT_EQ(parse({"--timer", "kernel"}).timer, TimerChoice::kKernel);
  EXPECT_EQ(parse({"--timer=event"}).timer, TimerChoice::kEvent);
  EXPECT_EQ(parse({"--timer", "event", "--timer", "auto"}).timer, TimerChoice::kAuto);
  EXPECT_STREQ(timerName(TimerChoice::kKernel), "kernel");
  EXPECT_STREQ(timerName(TimerChoice::kEvent), "event");
  EXPECT_NE(parseError({"--timer", "cupti"}).find("--timer: expected kernel, event"), std::string::npos);
  EXPECT_NE(parseError({"--timer"}).find("needs a value"), std::string::npos);
  EXPECT_NE(usageText().find("--timer T"), std::string::npos);
}

TEST(PerfOptions, Errors) {
  EXPECT_NE(parseError({"--bogus"}).find("unknown option"), std::string::npos);
  EXPECT_NE(parseError({"-x"}).find("unknown option"), std::string::npos);
  EXPECT_NE(parseError({"-n"}).find("needs a value"), std::string::npos);
  EXPECT_NE(parseError({"-n", "abc"}).find("-n/--iters"), std::string::npos);
  EXPECT_NE(parseError({"-c", "2"}).find("-c/--check"), std::string::npos);
  EXPECT_NE(parseError({"--topk", "17"}).find("--topk"), std::string::npos);
  EXPECT_NE(parseError({"-b", "512", "-e", "256"}).find("max-tokens"), std::string::npos);
  EXPECT_NE(parseError({"--routing", "zipf:1"}).find("--routing"), std::string::npos);
  EXPECT_NE(parseError({"--routing", "skewed:0.5"}).find("ratio >= 1"), std::string::npos);
  EXPECT_NE(parseError({"--routing", "masked:1"}).find("[0, 1)"), std::string::npos);
  EXPECT_NE(parseError({"--dtype", "fp16"}).find("--dtype"), std::string::npos);
  EXPECT_NE(parseError({"--mode", "both"}).find("--mode"), std::string::npos);
  EXPECT_NE(parseError({"--cpu=1"}).find("takes no value"), std::string::npos);
  EXPECT_NE(parseError({"stray"}).find("unexpected argument"), std::string::npos);
  EXPECT_NE(parseError({"-f", "1"}).find("-f/--step-factor"), std::string::npos);
}

TEST(PerfOptions, TokenSweep) {
  EXPECT_EQ(tokenSweep(64, 1024, 2, 0), (std::vector<int64_t>{64, 128, 256, 512, 1024}));
  EXPECT_EQ(tokenSweep(100, 350, 2, 100), (std::vector<int64_t>{100, 200, 300}));
  EXPECT_EQ(tokenSweep(1, 10, 3, 0), (std::vector<int64_t>{1, 3, 9}));
  EXPECT_EQ(tokenSweep(5, 1, 2, 0), (std::vector<int64_t>{5}));
  EXPECT_EQ(tokenSweep(3, 5, 1.2, 0), (std::vector<int64_t>{3, 4, 5}));  // always advances
  int64_t v = 0;
  EXPECT_TRUE(parseCount("2M", &v));
  EXPECT_EQ(v, 2 * 1024 * 1024);
  EXPECT_FALSE(parseCount("-1", &v));
  EXPECT_FALSE(parseCount("K", &v));
}

TEST(PerfOptions, ShapeChecks) {
  ModeConfig c = resolveMode(Options{}, Mode::kHt);
  EXPECT_EQ(checkShape(c, DType::kBf16, 8), "");
  EXPECT_NE(checkShape(c, DType::kBf16, 3).find("multiple of the rank count 3"), std::string::npos);
  c.hidden = 7172;
  EXPECT_NE(checkShape(c, DType::kBf16, 2).find("multiple of 8"), std::string::npos);
  c.hidden = 1032;  // % 8 == 0 but not % 16
  EXPECT_NE(checkShape(c, DType::kFp8, 2).find("multiple of 16"), std::string::npos);
  ModeConfig l = resolveMode(Options{}, Mode::kLl);
  EXPECT_EQ(checkShape(l, DType::kFp8, 8), "");
  l.hidden = 7176;
  EXPECT_NE(checkShape(l, DType::kFp8, 8).find("multiple of 128"), std::string::npos);
}

TEST(PerfOptions, ByteAccounting) {
  // semantics.md "How performance is reported".
  EXPECT_DOUBLE_EQ(htDispatchBytes(8192, 7168, DType::kBf16), 8192.0 * 7168 * 2);
  EXPECT_DOUBLE_EQ(htDispatchBytes(8192, 7168, DType::kFp8), 8192.0 * 7168 * (1 + 4.0 / 128));
  EXPECT_DOUBLE_EQ(htCombineBytes(8192, 7168), 8192.0 * 7168 * 2);
  EXPECT_DOUBLE_EQ(llDispatchBytes(1024, 7168, DType::kFp8), 1024.0 * (7168 + 7168 / 128 * 4 + 16));
  EXPECT_DOUBLE_EQ(llDispatchBytes(1024, 7168, DType::kBf16), 1024.0 * 7168 * 2);
  EXPECT_DOUBLE_EQ(llCombineBytes(1024, 7168), 1024.0 * 7168 * 2);
  EXPECT_DOUBLE_EQ(gbps(1e9, 1e6), 1.0);
  EXPECT_DOUBLE_EQ(gbps(117440512.0, 345.0), 117440512.0 / 345.0 / 1e3);
  EXPECT_DOUBLE_EQ(gbps(1.0, 0.0), 0.0);
}

TEST(PerfReport, JsonAndTable) {
  ResultRow r;
  r.mode = Mode::kHt;
  r.op = "dispatch";
  r.dtype = DType::kFp8;
  r.ranks = r.gpus = 2;
  r.sms = 24;
  r.tokens = 4096;
  r.hidden = 7168;
  r.topk = 8;
  r.experts = 256;
  r.available = true;
  r.median_us = 100;
  r.bytes_per_rank = 1e8;
  r.has_baseline = true;
  r.baseline_median_us = 200;
  r.checked = true;
  r.gpu_name = "NVIDIA \"H200\"";
  r.git_sha = "abc1234";
  const std::string j = toJson(r);
  for (const char* key : {"\"mode\":\"ht\"", "\"op\":\"dispatch\"", "\"dtype\":\"fp8\"", "\"gpus\":2", "\"sms\":24",
                          "\"tokens\":4096", "\"hidden\":7168", "\"topk\":8", "\"experts\":256",
                          "\"median_us\":100.000", "\"logical_gbps\":1000.000", "\"baseline_median_us\":200.000",
                          "\"verified\":true", "\"gpu_name\":\"NVIDIA \\\"H200\\\"\"", "\"git_sha\":\"abc1234\""})
    EXPECT_NE(j.find(key), std::string::npos) << key << " in " << j;
  EXPECT_NE(tableRow(r).find("1000.00"), std::string::npos);
  // Timer fields: "event" by default, the event medians null until set.
  for (const char* key :
       {"\"timer\":\"event\"", "\"event_median_us\":null", "\"baseline_event_median_us\":null", "\"timer_note\":null"})
    EXPECT_NE(j.find(key), std::string::npos) << key << " in " << j;
  EXPECT_EQ(tableRow(r).find("event-timed"), std::string::npos);

  r.available = false;
  r.error = "ncclMoeDispatch returned invalid usage: not implemented yet";
  const std::string j2 = toJson(r);
  EXPECT_NE(j2.find("\"median_us\":null"), std::string::npos);
  EXPECT_NE(j2.find("\"verified\":false"), std::string::npos);
  EXPECT_NE(j2.find("\"available\":false"), std::string::npos);
  EXPECT_NE(j2.find("not implemented yet"), std::string::npos);
  EXPECT_NE(tableRow(r).find("not available: ncclMoeDispatch"), std::string::npos);
  EXPECT_NE(tableRow(r).find("200.00"), std::string::npos);  // the baseline still shows

  EXPECT_EQ(jsonString("a\"b\\c\n\x01"), "\"a\\\"b\\\\c\\n\\u0001\"");

  // A kernel-timed row keeps the event medians of the same calls; a row that fell back says why.
  r.available = true;
  r.timer = "kernel";
  r.median_us = 90;
  r.event_median_us = 97.5;
  r.baseline_event_median_us = 210;
  const std::string j3 = toJson(r);
  for (const char* key : {"\"timer\":\"kernel\"", "\"median_us\":90.000", "\"event_median_us\":97.500",
                          "\"baseline_median_us\":200.000", "\"baseline_event_median_us\":210.000"})
    EXPECT_NE(j3.find(key), std::string::npos) << key << " in " << j3;
  r.timer = "event";
  r.timer_note = "rank 1: no complete CUPTI kernel record for 2 of 20 timed calls";
  EXPECT_NE(toJson(r).find("\"timer_note\":\"rank 1: no complete"), std::string::npos);
  EXPECT_NE(tableRow(r).find("[event-timed: rank 1: no complete"), std::string::npos);
  r.timer_note.clear();
  r.available = true;
  r.wrong = 3;
  EXPECT_FALSE(r.verified());
}

// ------------------------------------------------------------------------------------------------
// Ranks sharing a GPU (--ranks-per-gpu)
// ------------------------------------------------------------------------------------------------

RankLayout layoutOf(const std::vector<std::string>& args, int num_devices, std::string* error) {
  RankLayout l;
  *error = resolveGpuLayout(parse(args), num_devices, &l);
  return l;
}

TEST(PerfRanksPerGpu, Parsing) {
  EXPECT_EQ(parse({}).ranks_per_gpu, 1);  // one rank per GPU
  EXPECT_EQ(parse({"--ranks-per-gpu", "4"}).ranks_per_gpu, 4);
  EXPECT_EQ(parse({"--ranks-per-gpu=8", "-g", "8"}).ranks_per_gpu, 8);
  for (const char* bad : {"0", "9", "-1", "two", ""})
    EXPECT_NE(parseError({"--ranks-per-gpu", bad}).find("--ranks-per-gpu: expected an integer in [1, 8]"),
              std::string::npos)
        << bad;
  EXPECT_NE(parseError({"--ranks-per-gpu"}).find("needs a value"), std::string::npos);
  // One process: spawning processes is refused; --ranks-per-gpu 1 is the ordinary mode and combines with anything.
  EXPECT_NE(parseError({"--ranks-per-gpu", "2", "--procs", "2"}).find("cannot be combined with --procs"),
            std::string::npos);
  EXPECT_NE(parseError({"--procs", "2", "--ranks-per-gpu", "4"}).find("cannot be combined with --procs"),
            std::string::npos);
  EXPECT_EQ(parse({"--ranks-per-gpu", "1", "--procs", "2"}).procs, 2);
  EXPECT_NE(usageText().find("--ranks-per-gpu N"), std::string::npos);
}

TEST(PerfRanksPerGpu, DeviceMapping) {
  std::string err;
  // The example: 4 ranks on one GPU.
  RankLayout l = layoutOf({"-g", "4", "--ranks-per-gpu", "4"}, 1, &err);
  ASSERT_EQ(err, "");
  EXPECT_TRUE(l.sharedGpu());
  EXPECT_EQ(l.numRanks(), 4);
  EXPECT_EQ(l.ranksPerProc(), 4);
  EXPECT_EQ(l.numGpus(), 1);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(l.deviceOf(i), 0) << i;
  EXPECT_NE(l.describe().find("4 ranks = 1 process"), std::string::npos) << l.describe();
  EXPECT_NE(l.describe().find("on 1 GPU (4 ranks per GPU"), std::string::npos) << l.describe();
  // -g defaults to N: N ranks on GPU 0.
  l = layoutOf({"--ranks-per-gpu", "2"}, 8, &err);
  ASSERT_EQ(err, "");
  EXPECT_EQ(l.numRanks(), 2);
  EXPECT_EQ(l.numGpus(), 1);
  // Rank i on GPU i / N.
  l = layoutOf({"-g", "4", "--ranks-per-gpu", "2"}, 2, &err);
  ASSERT_EQ(err, "");
  EXPECT_EQ(l.numGpus(), 2);
  std::vector<int> devices;
  for (int i = 0; i < l.ranksPerProc(); ++i) devices.push_back(l.deviceOf(i));
  EXPECT_EQ(devices, (std::vector<int>{0, 0, 1, 1}));
  // -t counts too: 2 threads x 2 ranks each, 4 per GPU.
  l = layoutOf({"-t", "2", "-g", "2", "--ranks-per-gpu", "4"}, 1, &err);
  ASSERT_EQ(err, "");
  EXPECT_EQ(l.numRanks(), 4);
  EXPECT_EQ(l.numGpus(), 1);
  // Without --ranks-per-gpu: one GPU per rank, as before.
  l = layoutOf({"-g", "2"}, 2, &err);
  ASSERT_EQ(err, "");
  EXPECT_FALSE(l.sharedGpu());
  EXPECT_EQ(l.numGpus(), 2);
  EXPECT_EQ(l.deviceOf(0), 0);
  EXPECT_EQ(l.deviceOf(1), 1);
  l = layoutOf({"-g", "1"}, 1, &err);
  ASSERT_EQ(err, "");
  EXPECT_EQ(l.numRanks(), 1);
  EXPECT_EQ(l.numGpus(), 1);
}

TEST(PerfRanksPerGpu, LayoutsThatCannotWorkAreRefused) {
  std::string err;
  layoutOf({"-g", "3", "--ranks-per-gpu", "2"}, 2, &err);
  EXPECT_NE(err.find("must be a multiple of 2"), std::string::npos) << err;
  layoutOf({"-g", "8", "--ranks-per-gpu", "2"}, 2, &err);
  EXPECT_NE(err.find("need 4 GPUs"), std::string::npos) << err;
  layoutOf({"-t", "4", "-g", "4", "--ranks-per-gpu", "4"}, 4, &err);
  EXPECT_NE(err.find("at most 8 ranks"), std::string::npos) << err;
  layoutOf({"-g", "2", "--ranks-per-gpu", "2"}, 0, &err);
  EXPECT_NE(err.find("only 0 are visible"), std::string::npos) << err;
  // Under an MPI launcher (several processes): refused, the ranks must all be threads of one process.
  ::setenv("OMPI_COMM_WORLD_RANK", "0", 1);
  ::setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
  layoutOf({"-g", "2", "--ranks-per-gpu", "2"}, 1, &err);
  ::unsetenv("OMPI_COMM_WORLD_RANK");
  ::unsetenv("OMPI_COMM_WORLD_SIZE");
  EXPECT_NE(err.find("cannot be combined with --procs or an MPI launcher"), std::string::npos) << err;
}

TEST(PerfRanksPerGpu, HtSmBudgetIsTheRanksShare) {
  // 132 SMs shared by 4 ranks: at most 33 per rank; 0 (the library's share) always fits.
  EXPECT_EQ(checkSharedGpuSms({0, 24, 33}, 132, 4), "");
  const std::string err = checkSharedGpuSms({24, 34}, 132, 4);
  EXPECT_NE(err.find("--sms 34"), std::string::npos) << err;
  EXPECT_NE(err.find("at most 33 SMs"), std::string::npos) << err;
  EXPECT_EQ(checkSharedGpuSms({132}, 132, 1), "");  // not shared: the library checks against the whole GPU
}

TEST(PerfReport, HonestLabels) {
  ResultRow r;
  r.mode = Mode::kHt;
  r.op = "dispatch";
  r.tokens = 4096;
  r.hidden = 7168;
  r.topk = 8;
  r.experts = 256;
  r.available = true;
  r.median_us = 100;
  r.bytes_per_rank = 1e8;
  r.checked = true;
  // Ranks sharing one GPU: the real GPU count, the rank count, the flag, and no baseline (with the reason).
  r.ranks = 4;
  r.gpus = 1;
  r.shared_gpu = true;
  r.baseline_note = "ranks share a GPU";
  std::string j = toJson(r);
  for (const char* key :
       {"\"gpus\":1", "\"ranks\":4", "\"shared_gpu\":true", "\"baseline_median_us\":null", "\"baseline_gbps\":null",
        "\"baseline_wrong\":null", "\"baseline_note\":\"ranks share a GPU\"", "\"verified\":true"})
    EXPECT_NE(j.find(key), std::string::npos) << key << " in " << j;
  std::string t = tableRow(r);
  EXPECT_NE(t.find("baseline: n/a (ranks share a GPU)"), std::string::npos) << t;
  EXPECT_NE(t.find("[shared GPU: correctness only]"), std::string::npos) << t;
  EXPECT_EQ(t.find("[1 rank"), std::string::npos) << t;
  EXPECT_NE(tableHeader().find("ranks gpus"), std::string::npos) << tableHeader();
  EXPECT_NE(t.find("     4    1  dispatch"), std::string::npos) << t;  // the ranks and gpus columns

  // One rank: it moved nothing between GPUs, and says so.
  r.ranks = 1;
  r.gpus = 1;
  r.shared_gpu = false;
  r.baseline_note.clear();
  r.has_baseline = true;
  r.baseline_median_us = 50;
  j = toJson(r);
  for (const char* key : {"\"gpus\":1", "\"ranks\":1", "\"shared_gpu\":false", "\"baseline_note\":null"})
    EXPECT_NE(j.find(key), std::string::npos) << key << " in " << j;
  t = tableRow(r);
  EXPECT_NE(t.find("[1 rank: everything local]"), std::string::npos) << t;
  EXPECT_EQ(t.find("shared GPU"), std::string::npos) << t;
  EXPECT_EQ(t.find("baseline: n/a"), std::string::npos) << t;

  // Two ranks on two GPUs: no marker at all.
  r.ranks = r.gpus = 2;
  t = tableRow(r);
  EXPECT_EQ(t.find("["), std::string::npos) << t;
}

ProblemSpec smallSpec(Mode mode, DType dtype);

TEST(PerfReport, RowsCarryRanksAndGpus) {
  const Problem p = buildProblem(smallSpec(Mode::kHt, DType::kBf16));  // 4 ranks
  RunInfo run;
  // CPU mode: ranks are threads, no GPU.
  ResultRow cpu = makeRow(run, p, "dispatch", 0, true);
  EXPECT_EQ(cpu.ranks, 4);
  EXPECT_EQ(cpu.gpus, 0);
  EXPECT_FALSE(cpu.shared_gpu);
  EXPECT_NE(toJson(cpu).find("\"gpus\":0,\"ranks\":4,\"shared_gpu\":false"), std::string::npos) << toJson(cpu);
  EXPECT_NE(tableRow(cpu).find("     4    -  dispatch"), std::string::npos) << tableRow(cpu);
  // One rank per GPU.
  run.num_gpus = 4;
  ResultRow gpu = makeRow(run, p, "dispatch", 0, false);
  EXPECT_EQ(gpu.ranks, 4);
  EXPECT_EQ(gpu.gpus, 4);
  EXPECT_FALSE(gpu.shared_gpu);
  // Four ranks on one GPU.
  run.num_gpus = 1;
  run.ranks_per_gpu = 4;
  ResultRow shared = makeRow(run, p, "dispatch", 0, false);
  EXPECT_EQ(shared.ranks, 4);
  EXPECT_EQ(shared.gpus, 1);
  EXPECT_TRUE(shared.shared_gpu);
  // CPU rows never claim a shared GPU.
  EXPECT_FALSE(makeRow(run, p, "dispatch", 0, true).shared_gpu);
}

// ------------------------------------------------------------------------------------------------
// Baseline plans and verification against the reference
// ------------------------------------------------------------------------------------------------

ProblemSpec smallSpec(Mode mode, DType dtype) {
  ProblemSpec s;
  s.mode = mode;
  s.dtype = dtype;
  s.num_ranks = 4;
  s.tokens = 37;
  s.hidden = 256;
  s.topk = 5;
  s.experts = 16;
  s.ll_max_tokens = 40;
  s.expert_alignment = mode == Mode::kHt ? 4 : 1;
  s.routing.skew = 1.5;
  s.routing.masked_fraction = 0.15;
  s.seed = 7;
  return s;
}

class PerfBaseline : public ::testing::TestWithParam<std::tuple<Mode, DType>> {};

TEST_P(PerfBaseline, CpuBaselineMatchesReferenceAndChecksCatchCorruption) {
  const auto [mode, dtype] = GetParam();
  const Problem p = buildProblem(smallSpec(mode, dtype));
  RankTeam team(p.spec.num_ranks);
  CpuBaseline bl(p, &team);
  bl.dispatch();
  bl.combine();
  EXPECT_EQ(bl.dispatchWrong(), 0);
  EXPECT_EQ(bl.combineWrong(), 0);
  // Repeating is idempotent.
  bl.dispatch();
  bl.combine();
  EXPECT_EQ(bl.dispatchWrong(), 0);
  EXPECT_EQ(bl.combineWrong(), 0);

  // One flipped element of a received row, one of a combined output.
  const int d = 1;
  const size_t row = 0;
  if (mode == Mode::kHt) {
    ASSERT_GT(p.numRecv(d), 0);
    bl.dispatch_out[d][row * p.fmt.rowBytes() + 3] ^= 0x40;
  } else {
    ASSERT_GT(p.ll.recv[d].recv_count[0], 0);
    bl.dispatch_out[d][row * p.fmt.rowBytes() + 3] ^= 0x40;
  }
  EXPECT_EQ(bl.dispatchWrong(), 1);
  bl.combine_out[2][5] ^= 0x1;
  EXPECT_EQ(bl.combineWrong(), 1);
}

INSTANTIATE_TEST_SUITE_P(Modes, PerfBaseline,
                         ::testing::Combine(::testing::Values(Mode::kHt, Mode::kLl),
                                            ::testing::Values(DType::kBf16, DType::kFp8)));

TEST(PerfPlan, HtPlanMatchesTraffic) {
  const Problem p = buildProblem(smallSpec(Mode::kHt, DType::kBf16));
  const int R = p.spec.num_ranks;
  for (int r = 0; r < R; ++r) {
    const HtPlan pl = makeHtPlan(p.ht, r);
    for (int d = 0; d < R; ++d) {
      EXPECT_EQ(pl.send_counts[d], p.traffic[r * R + d]);
      EXPECT_EQ(pl.recv_counts[d], p.traffic[d * R + r]);
    }
    EXPECT_EQ(pl.recv_offsets.back(), p.numRecv(r));
    // Tokens ascending inside each destination group.
    for (int d = 0; d < R; ++d)
      EXPECT_TRUE(
          std::is_sorted(pl.send_tokens.begin() + pl.send_offsets[d], pl.send_tokens.begin() + pl.send_offsets[d + 1]));
  }
}

TEST(PerfPlan, LlPlanMatchesTraffic) {
  const Problem p = buildProblem(smallSpec(Mode::kLl, DType::kFp8));
  const int R = p.spec.num_ranks;
  for (int r = 0; r < R; ++r) {
    const LlPlan pl = makeLlPlan(p.routing, p.ll, r);
    for (int d = 0; d < R; ++d) {
      EXPECT_EQ(pl.send_counts[d], p.traffic[r * R + d]);
      EXPECT_EQ(pl.recv_counts[d], p.traffic[d * R + r]);
    }
    EXPECT_EQ(pl.recv_offsets.back(), p.numLlRecv(r));
    std::vector<int> sorted = pl.recv_slab_rows;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_TRUE(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end()) << "slab rows must be distinct";
  }
}

TEST(PerfVerify, LlSlabsAreComparedAsSets) {
  const Problem p = buildProblem(smallSpec(Mode::kLl, DType::kFp8));
  const int d = 2, El = p.numLocalExperts(), slab = p.slabRows();
  const ref::LlDispatch full =
      ref::ll_dispatch(p.routing, p.spec.hidden, p.spec.ll_max_tokens, &p.x_bf16, true, ref::ScaleFormat::kFloat);
  ref::LlRankRecv rv = full.recv[d];
  std::vector<int32_t> identity;
  EXPECT_EQ(llRecvWrong(p, d, rv.recv_count.data(), RowView::split(rv.fp8.data(), rv.scales.data(), p.fmt), &identity),
            0);
  // Reverse the rows of every slab (data and scales together): still right, and the identities follow the rows.
  const size_t H = p.spec.hidden, G = p.fmt.groups;
  for (int j = 0; j < El; ++j) {
    const int n = rv.recv_count[j];
    for (int i = 0; i < n / 2; ++i) {
      const size_t a = size_t(j) * slab + i, b = size_t(j) * slab + (n - 1 - i);
      std::swap_ranges(rv.fp8.begin() + a * H, rv.fp8.begin() + (a + 1) * H, rv.fp8.begin() + b * H);
      std::swap_ranges(rv.scales.begin() + a * G, rv.scales.begin() + (a + 1) * G, rv.scales.begin() + b * G);
    }
  }
  std::vector<int32_t> shuffled;
  EXPECT_EQ(llRecvWrong(p, d, rv.recv_count.data(), RowView::split(rv.fp8.data(), rv.scales.data(), p.fmt), &shuffled),
            0);
  const std::vector<uint16_t> y = llExpertOutputsFor(p, d, shuffled);
  for (int j = 0; j < El; ++j) {
    const int n = rv.recv_count[j];
    for (int i = 0; i < n; ++i) {
      const size_t a = size_t(j) * slab + i, b = size_t(j) * slab + (n - 1 - i);
      EXPECT_EQ(shuffled[a], identity[b]);
      EXPECT_TRUE(std::equal(y.begin() + a * H, y.begin() + (a + 1) * H, p.ll_y[d].begin() + b * H));
    }
  }
  // A missing row and a corrupted scale are caught.
  std::vector<int> counts = rv.recv_count;
  ASSERT_GT(counts[0], 0);
  counts[0] -= 1;
  EXPECT_EQ(llRecvWrong(p, d, counts.data(), RowView::split(rv.fp8.data(), rv.scales.data(), p.fmt), nullptr),
            1 + p.fmt.elemsPerRow());
  rv.scales[0] *= 2.0f;
  EXPECT_EQ(llRecvWrong(p, d, rv.recv_count.data(), RowView::split(rv.fp8.data(), rv.scales.data(), p.fmt), nullptr),
            1);
}

TEST(PerfVerify, HtMetadata) {
  const Problem p = buildProblem(smallSpec(Mode::kHt, DType::kBf16));
  const int d = 3;
  const ref::HtRankRecv& rv = p.ht.recv[d];
  EXPECT_EQ(htMetaWrong(p, d, rv.num_recv, &rv.num_recv_per_expert, rv.topk_idx.data(), rv.topk_weights.data()), 0);
  std::vector<int64_t> idx = rv.topk_idx;
  idx[1] = idx[1] < 0 ? 0 : -1;
  EXPECT_EQ(htMetaWrong(p, d, rv.num_recv, nullptr, idx.data(), nullptr), 1);
  std::vector<int> per_expert = rv.num_recv_per_expert;
  per_expert[0] += 4;
  EXPECT_EQ(htMetaWrong(p, d, rv.num_recv, &per_expert, nullptr, nullptr), 1);
  EXPECT_EQ(htMetaWrong(p, d, rv.num_recv + 1, nullptr, nullptr, nullptr), 1);
}

}  // namespace
}  // namespace nccl_moe::perf
