// moe-perf: benchmark of NCCL-MoE dispatch/combine next to an NCCL all-to-all baseline, in the style of nccl-tests.
// docs/moe-perf.md describes options, modes, byte accounting and the JSON schema.
//
// main() parses the options, picks the backend (GPU unless --cpu or no GPU is visible), spawns processes for
// --procs, prints the header (global rank 0 only) and hands over to cpu_backend / gpu_backend.
//
// Ranks sharing a GPU (--ranks-per-gpu N > 1): main() sets CUDA_DEVICE_MAX_CONNECTIONS=32 and CUDA_MODULE_LOADING=EAGER
// (unless the environment already has values) before the process's first CUDA call, because with the default of 8
// hardware queues the streams of two ranks may share one and a kernel that waits for its peer could queue behind
// that peer's kernel, and a lazily loaded kernel waits for the device at its first launch;
// it refuses HT --sms values above SMs / N before any rank starts, and prints loudly that the run checks
// correctness only. Nothing in that mode calls NCCL (not even ncclGetVersion). Their ncclMoeCommInitAll world may
// be split into virtual nodes (NCCL_MOE_NET=emulated NCCL_MOE_EMULATE_NODES=n): main() asks the library for the node
// count first (probeWorldNodes), refuses nodes of unequal size and a disagreeing --ranks-per-node there (exit 2,
// before any MoE call), and the HT and LL rows are labelled "software NIC — correctness/functional timing, not
// performance" (perf/transport.h).
#include <cuda_runtime.h>
#include <execinfo.h>
#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/env.h"
#include "cpu_backend.h"
#include "gpu_backend.h"
#include "gpu_session.h"
#include "gpu_transport.h"
#include "launcher.h"
#include "nccl_moe.h"
#include "options.h"
#include "report.h"
#include "run_common.h"
#include "transport.h"

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
  const bool shared_gpu = run.options.ranks_per_gpu > 1 && !run.options.cpu;
  const bool no_nccl = shared_gpu || run.options.transport;
  if (ncclMoeGetVersion(&lib) != ncclSuccess) lib = 0;
  if (!no_nccl && ncclGetVersion(&nccl) != ncclSuccess) nccl = 0;
  if (cudaRuntimeGetVersion(&rt) != cudaSuccess) rt = 0;
  if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;
  out("# moe-perf %s (NCCL-MoE library %s), git %s\n", versionText(NCCL_MOE_VERSION_CODE).c_str(),
      lib ? versionText(lib).c_str() : "unknown", run.git_sha.c_str());
  const std::string nccl_text = run.options.transport ? "not used (transport mode)"
                                : shared_gpu          ? "not used (ranks share a GPU)"
                                : nccl                ? versionText(nccl)
                                                      : "unknown";
  out("# NCCL %s, CUDA runtime %d.%d, driver %s\n", nccl_text.c_str(), rt / 1000, rt % 1000 / 10,
      drv ? (std::to_string(drv / 1000) + "." + std::to_string(drv % 1000 / 10)).c_str() : "none");
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

// Ranks sharing a GPU: the CUDA_DEVICE_MAX_CONNECTIONS line, loud when the value is below what the library wants.
void printConnections() {
  const char* v = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
  const int n = v != nullptr ? std::atoi(v) : 8;
  if (n >= 32) {
    out("# CUDA_DEVICE_MAX_CONNECTIONS=%d (ranks sharing a GPU each get their own hardware queues)\n", n);
  } else {
    out("# !!! CUDA_DEVICE_MAX_CONNECTIONS=%s (set before moe-perf started) is below 32: two ranks' streams may\n"
        "# !!! share a hardware queue, and a kernel waiting for its peer can time out (NCCL_MOE_TIMEOUT_S)\n",
        v != nullptr ? v : "unset (8)");
  }
}

// Ranks sharing a GPU split its SMs: refuse HT SM budgets above a rank's share before any rank starts. "" when fine.
std::string checkSharedSms(const Options& options, const RankLayout& layout) {
  const std::vector<Mode> modes = resolveModes(options);
  if (!layout.sharedGpu() || std::find(modes.begin(), modes.end(), Mode::kHt) == modes.end()) return "";
  int device_sms = 0;
  for (int d = 0; d < layout.numGpus(); ++d) {
    int sms = 0;
    const cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d);
    if (e != cudaSuccess) return std::string("cudaDeviceGetAttribute(multiProcessorCount): ") + cudaGetErrorString(e);
    device_sms = d == 0 ? sms : std::min(device_sms, sms);
  }
  return checkSharedGpuSms(options.sms, device_sms, layout.ranks_per_gpu);
}

// --mode transport: two virtual nodes on GPU 0 over the software NIC (perf/transport.h). Refuses what cannot work
// (exit 2) before any CUDA call but the device count; sets CUDA_DEVICE_MAX_CONNECTIONS=32 and
// CUDA_MODULE_LOADING=EAGER (unless already set) before it.
int mainTransport(RunInfo* run, JsonLinesWriter* json, int argc, char** argv);

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

int mainTransport(RunInfo* run, JsonLinesWriter* json, int argc, char** argv) {
  const Options& o = run->options;
  std::string err = checkTransportOptions(o);
  if (err.empty()) err = checkTransportConfig(resolveTransport(o));
  if (err.empty()) err = checkTransportNet(nccl_moe::envString("NCCL_MOE_NET").c_str());
  if (err.empty() && inMultiProcessJob())
    err = "--mode transport runs in one process (two virtual nodes on GPU 0): not under mpirun";
  int num_devices = 0;
  if (err.empty() && o.cpu)
    err = "--mode transport needs a CUDA GPU (the software NIC's CUDA memory backend): no --cpu";
  if (err.empty()) {
    // Before the process's first CUDA call, as the transport's GPU tests do (tests/gpu/gpu_env.cc): the two ranks'
    // kernels spin while the NICs' copy and atomic streams must still run (distinct hardware queues), and the
    // sender's kernel must not be loaded lazily at its first launch while the receiver's already spins.
    ::setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
    ::setenv("CUDA_MODULE_LOADING", "EAGER", 0);
    const cudaError_t e = cudaGetDeviceCount(&num_devices);
    if (e != cudaSuccess || num_devices == 0)
      err = std::string("--mode transport needs a CUDA GPU (the software NIC's CUDA memory backend): ") +
            (e != cudaSuccess ? std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e) : "no device");
  }
  if (!err.empty()) {
    std::fprintf(stderr, "moe-perf: %s\n", err.c_str());
    return 2;
  }
  printHeader(*run, argc, argv);
  printConnections();
  const char* loading = std::getenv("CUDA_MODULE_LOADING");
  if (loading == nullptr || std::string(loading) != "EAGER")
    out("# !!! CUDA_MODULE_LOADING=%s (set before moe-perf started): a kernel loaded at its first launch while a\n"
        "# !!! peer's kernel spins can stall until the device wait times out\n",
        loading != nullptr ? loading : "unset");
  if (o.threads > 0 || o.gpus > 0) out("# -t/-g ignored: the transport mode runs 2 ranks (virtual nodes) on GPU 0\n");
  if (!openJson(run, json)) return 2;
  return runTransport(*run);
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
  if (options.transport) return mainTransport(&run, &json, argc, argv);
  // Before the first CUDA call of the process (the runtime reads it when it creates the context).
  if (options.ranks_per_gpu > 1 && !options.cpu) {
    ::setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
    // Every kernel loaded at start: a lazily loaded one (moe-perf's own, or a runtime memset) waits for the device at
    // its first launch, while a peer's kernel may spin until this rank's next call (src/ops/load.cc has the why).
    ::setenv("CUDA_MODULE_LOADING", "EAGER", 0);
  }

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
    run.options.ranks_per_gpu = 1;  // no GPU to share
    printHeader(run, argc, argv);
    if (options.procs > 0) out("# --procs is ignored in CPU mode (threads are the ranks)\n");
    if (options.ranks_per_gpu > 1) out("# --ranks-per-gpu is ignored in CPU mode (no GPU; threads are the ranks)\n");
    if (!detail.empty()) out("# %s\n", detail.c_str());
    if (ranks == 1) printOneRankNote(true);
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
  err = checkSharedSms(options, layout);
  if (!err.empty()) {
    std::fprintf(stderr, "moe-perf: %s\n", err.c_str());
    return 2;
  }
  // Ranks sharing a GPU form one ncclMoeCommInitAll world, which NCCL_MOE_EMULATE_NODES may split into virtual
  // nodes: ask the library how many before any MoE call, refuse what cannot run there, and label the rows.
  std::string probe_note;
  if (layout.sharedGpu()) {
    std::vector<int> devices;
    for (int r = 0; r < layout.numRanks(); ++r) devices.push_back(layout.deviceOf(r));
    probe_note = probeWorldNodes(devices, &run.comm_nodes);
    err = checkCommNodes(resolveModes(options), options.ranks_per_node, layout.numRanks(), run.comm_nodes);
    if (!err.empty()) {
      std::fprintf(stderr, "moe-perf: %s\n", err.c_str());
      return 2;
    }
  }
  run.num_gpus = layout.numGpus();
  run.ranks_per_gpu = layout.ranks_per_gpu;
  if (layout.proc_rank == 0) {
    printHeader(run, argc, argv);
    out("# %s, %d GPUs visible to this process\n", layout.describe().c_str(), num_devices);
    if (layout.sharedGpu()) {
      printConnections();
      printSharedGpuBanner(layout.numRanks(), layout.numGpus(), layout.ranks_per_gpu);
      if (!probe_note.empty())
        out("# node count of the MoE world not known (%s); the MoE rows will say why\n", probe_note.c_str());
      if (run.comm_nodes > 1) out("%s", softNicMoeBanner(run.comm_nodes, layout.numRanks(), layout.numGpus()).c_str());
    }
    if (layout.numRanks() == 1) printOneRankNote(false);
    if (!openJson(&run, &json)) return 2;
  }
  return runGpu(run, layout, num_devices);
}
