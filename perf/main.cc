// moe-perf: benchmark of NCCL-MoE dispatch/combine next to an NCCL all-to-all baseline, in the style of nccl-tests.
// docs/moe-perf.md describes options, modes, byte accounting and the JSON schema.
//
// main() parses the options, picks the backend (GPU unless --cpu or no GPU is visible), spawns processes for
// --procs, prints the header (global rank 0 only) and hands over to cpu_backend / gpu_backend.
#include <cuda_runtime.h>
#include <nccl.h>

#include <execinfo.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "cpu_backend.h"
#include "gpu_backend.h"
#include "launcher.h"
#include "nccl_moe.h"
#include "options.h"
#include "report.h"
#include "run_common.h"

#ifndef MOE_PERF_GIT_SHA
#define MOE_PERF_GIT_SHA "unknown"
#endif

namespace {

using namespace nccl_moe::perf;

std::string versionText(int code) {
  return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." + std::to_string(code % 100);
}

void printHeader(const RunInfo& run, int argc, char** argv) {
  int lib = 0, nccl = 0, rt = 0, drv = 0;
  if (ncclMoeGetVersion(&lib) != ncclSuccess) lib = 0;
  if (ncclGetVersion(&nccl) != ncclSuccess) nccl = 0;
  if (cudaRuntimeGetVersion(&rt) != cudaSuccess) rt = 0;
  if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;
  out("# moe-perf %s (NCCL-MoE library %s), git %s\n", versionText(NCCL_MOE_VERSION_CODE).c_str(),
      lib ? versionText(lib).c_str() : "unknown", run.git_sha.c_str());
  out("# NCCL %s, CUDA runtime %d.%d, driver %s\n", nccl ? versionText(nccl).c_str() : "unknown", rt / 1000,
      rt % 1000 / 10, drv ? (std::to_string(drv / 1000) + "." + std::to_string(drv % 1000 / 10)).c_str() : "none");
  std::string cmd;
  for (int i = 0; i < argc; ++i) cmd += (i ? " " : "") + std::string(argv[i]);
  out("# command: %s\n", cmd.c_str());
}

// A crash prints the raw stack to stderr before the default action (core, exit 128 + signal): a benchmark
// that dies on a shared machine without a debugger should still say where. Async-signal-safe calls only.
void onFatalSignal(int sig) {
  static const char kMsg[] = "moe-perf: fatal signal; stack (addr2line -e moe-perf -f -C <offset>):\n";
  ssize_t ignored = write(STDERR_FILENO, kMsg, sizeof(kMsg) - 1);
  (void)ignored;
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), STDERR_FILENO);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

bool openJson(RunInfo* run, JsonLinesWriter* json) {
  if (run->options.json_path.empty()) return true;
  std::string err;
  if (!json->open(run->options.json_path, &err)) {
    std::fprintf(stderr, "moe-perf: %s\n", err.c_str());
    return false;
  }
  run->json = json;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) std::signal(sig, onFatalSignal);
  // backtrace() loads libgcc on first use, which is not async-signal-safe: do it now.
  {
    void* frame[1];
    (void)backtrace(frame, 1);
  }
  Options options;
  std::string err;
  if (!parseOptions(std::vector<std::string>(argv + 1, argv + argc), &options, &err)) {
    std::fprintf(stderr, "moe-perf: %s\n", err.c_str());
    return 2;
  }
  if (options.help) {
    std::printf("%s", usageText().c_str());
    return 0;
  }
  RunInfo run;
  run.options = options;
  run.git_sha = MOE_PERF_GIT_SHA;
  JsonLinesWriter json;

  // Backend: GPU unless --cpu or no GPU.
  bool cpu = options.cpu;
  std::string reason = "--cpu", detail;
  int num_devices = 0;
  if (!cpu) {
    const cudaError_t e = cudaGetDeviceCount(&num_devices);
    if (e != cudaSuccess || num_devices == 0) {
      cpu = true;
      reason = "no GPU found";
      detail = e != cudaSuccess ? std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e)
                                : std::string("cudaGetDeviceCount: 0 devices");
      num_devices = 0;
    }
  }

  if (cpu) {
    // The CPU reference runs in one process; other processes of an MPI job have nothing to do.
    if (processRankFromEnv() != 0) return 0;
    int ranks = 2;
    if (options.threads > 0 || options.gpus > 0)
      ranks = (options.threads > 0 ? options.threads : 1) * (options.gpus > 0 ? options.gpus : 1);
    printHeader(run, argc, argv);
    if (options.procs > 0) out("# --procs is ignored in CPU mode (threads are the ranks)\n");
    if (!detail.empty()) out("# %s\n", detail.c_str());
    if (!openJson(&run, &json)) return 2;
    return runCpu(run, ranks, reason);
  }

  if (options.procs > 0 && !inMultiProcessJob()) return spawnProcesses(options.procs, argc, argv);

  RankLayout layout;
  err = resolveGpuLayout(options, num_devices, &layout);
  if (!err.empty()) {
    std::fprintf(stderr, "moe-perf: %s\n", err.c_str());
    return 2;
  }
  if (layout.proc_rank == 0) {
    printHeader(run, argc, argv);
    out("# %s, %d GPUs visible to this process\n", layout.describe().c_str(), num_devices);
    if (!openJson(&run, &json)) return 2;
  }
  return runGpu(run, layout, num_devices);
}
