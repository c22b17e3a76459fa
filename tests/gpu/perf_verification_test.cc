// moe-perf's verification catches a write a kernel skipped: every verified call starts from outputs filled with a
// marker (perf/verify.h), and --inject-skipped-write sets one written row back to it after the call. A clean run
// must verify (exit 0, every row "wrong": 0); the injected run must fail and count wrong elements in dispatch and
// combine, HT and LL alike.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>

#include "gpu_world.h"

namespace {

#ifdef NCCL_MOE_PERF_PATH

struct PerfRun {
  int exit_code = -1;
  std::string output;
  std::map<std::string, long long> wrong;  // op -> sum of "wrong" over its rows
  int rows = 0;
};

PerfRun runPerf(const std::string& args, const std::string& tag) {
  PerfRun run;
  const std::string json = "/tmp/nccl_moe_perf_verification_" + std::to_string(getpid()) + "_" + tag + ".jsonl";
  std::remove(json.c_str());
  const std::string cmd = std::string(NCCL_MOE_PERF_PATH) + " " + args + " -q -J " + json + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return run;
  char buf[4096];
  while (std::fgets(buf, sizeof(buf), pipe) != nullptr) run.output += buf;
  const int status = pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(json);
  std::string line;
  const std::regex op_re("\"op\":\"([a-z_]+)\""), wrong_re("\"wrong\":(-?[0-9]+)");
  while (std::getline(in, line)) {
    std::smatch op, wrong;
    if (!std::regex_search(line, op, op_re) || !std::regex_search(line, wrong, wrong_re)) continue;
    run.wrong[op[1]] += std::stoll(wrong[1]);
    ++run.rows;
  }
  std::remove(json.c_str());
  return run;
}

void expectCaught(const std::string& mode_args, const std::string& tag) {
  const PerfRun clean = runPerf(mode_args, tag + "_clean");
  ASSERT_EQ(0, clean.exit_code) << "clean run failed:\n" << clean.output;
  ASSERT_GT(clean.rows, 0) << clean.output;
  for (const auto& [op, wrong] : clean.wrong) EXPECT_EQ(0, wrong) << op << "\n" << clean.output;

  const PerfRun injected = runPerf(mode_args + " --inject-skipped-write", tag + "_injected");
  EXPECT_NE(0, injected.exit_code) << "a skipped write went unnoticed:\n" << injected.output;
  for (const char* op : {"dispatch", "combine"}) {
    ASSERT_EQ(1u, injected.wrong.count(op)) << op << " row missing:\n" << injected.output;
    EXPECT_GT(injected.wrong.at(op), 0) << op << ": the skipped write was not counted\n" << injected.output;
  }
}

TEST(PerfVerification, HtCatchesASkippedWrite) {
  if (gpu_test::gpuCount() == 0) GTEST_SKIP() << "no GPU";
  expectCaught("--mode ht -g 1 --tokens 64 --dtype bf16,fp8 -n 1 -w 0", "ht");
}

TEST(PerfVerification, LlCatchesASkippedWrite) {
  if (gpu_test::gpuCount() == 0) GTEST_SKIP() << "no GPU";
  expectCaught("--mode ll -g 1 -b 8 -e 8 -n 1 -w 0", "ll");
}

#else

TEST(PerfVerification, HtCatchesASkippedWrite) { GTEST_SKIP() << "moe-perf is not built"; }
TEST(PerfVerification, LlCatchesASkippedWrite) { GTEST_SKIP() << "moe-perf is not built"; }

#endif

}  // namespace
