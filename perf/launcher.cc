// Rank layout, rendezvous and the --procs launcher (contract in launcher.h).
#include "launcher.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <thread>

extern char** environ;

namespace nccl_moe::perf {

namespace {

const char* kEnvProcRank = "MOE_PERF_PROC_RANK";
const char* kEnvNumProcs = "MOE_PERF_NUM_PROCS";

bool envInt(const char* name, int* out) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return false;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (end == nullptr || *end != '\0' || x < 0 || x > (1 << 24)) return false;
  *out = static_cast<int>(x);
  return true;
}

// World rank/size of an MPI launcher, if any.
bool mpiWorld(int* rank, int* size) {
  return (envInt("OMPI_COMM_WORLD_RANK", rank) && envInt("OMPI_COMM_WORLD_SIZE", size)) ||
         (envInt("PMI_RANK", rank) && envInt("PMI_SIZE", size));
}

int mpiLocalRank(int world_rank) {
  int v = 0;
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"})
    if (envInt(name, &v)) return v;
  return world_rank;  // unknown: assume one host
}

int mpiLocalSize() {
  int v = 0;
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"})
    if (envInt(name, &v)) return v;
  return -1;
}

int freeLocalPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  int port = -1;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0)
    port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

std::string resolveSharedGpuLayout(const Options& o, int num_devices, RankLayout l, RankLayout* layout) {
  const int n = o.ranks_per_gpu;
  std::ostringstream os;
  if (l.num_procs > 1 || l.mpi || l.spawned) {
    os << "--ranks-per-gpu " << n << " runs every rank in this one process (ncclMoeCommInitAll, no NCCL); it "
       << "cannot be combined with --procs or an MPI launcher (" << l.num_procs << " processes)";
    return os.str();
  }
  l.ranks_per_gpu = n;
  l.gpus_per_thread = o.gpus > 0 ? o.gpus : std::max(1, n / l.threads);
  const int ranks = l.numRanks();
  if (ranks % n != 0) {
    os << "--ranks-per-gpu " << n << ": the rank count " << ranks << " (-t " << l.threads << " x -g "
       << l.gpus_per_thread << ") must be a multiple of " << n << " (every GPU holds " << n << " ranks)";
  } else if (ranks > kMaxSharedGpuRanks) {
    os << "--ranks-per-gpu " << n << ": " << ranks << " ranks, but one process (one node) holds at most "
       << kMaxSharedGpuRanks << " ranks";
  } else if (l.numGpus() > num_devices) {
    os << "--ranks-per-gpu " << n << ": " << ranks << " ranks need " << l.numGpus() << " GPUs (rank i on GPU i / " << n
       << ") but only " << num_devices << " are visible";
  }
  if (!os.str().empty()) return os.str();
  *layout = l;
  return "";
}

}  // namespace

std::string RankLayout::describe() const {
  std::ostringstream os;
  if (sharedGpu()) {
    os << numRanks() << " ranks = 1 process x " << threads << " threads x " << gpus_per_thread
       << " ranks per thread on " << numGpus() << (numGpus() == 1 ? " GPU" : " GPUs") << " (" << ranks_per_gpu
       << " ranks per GPU, one host thread per rank)";
    return os.str();
  }
  os << numRanks() << " ranks = " << num_procs << " processes x " << threads << " threads x " << gpus_per_thread
     << " GPUs per thread";
  if (gpus_per_thread > 1) os << " (one host thread per GPU)";
  if (mpi) os << " (MPI launcher)";
  if (spawned) os << " (--procs)";
  return os.str();
}

bool inMultiProcessJob() {
  int a = 0, b = 0;
  return std::getenv(kEnvProcRank) != nullptr || mpiWorld(&a, &b);
}

int processRankFromEnv() {
  int rank = 0, size = 0;
  if (envInt(kEnvProcRank, &rank)) return rank;
  if (mpiWorld(&rank, &size)) return rank;
  return 0;
}

std::string resolveGpuLayout(const Options& o, int num_devices, RankLayout* layout) {
  RankLayout l;
  int rank = 0, size = 0;
  if (envInt(kEnvProcRank, &rank) && envInt(kEnvNumProcs, &size)) {
    l.spawned = true;
    l.num_procs = size;
    l.proc_rank = rank;
    l.local_proc_rank = rank;
  } else if (mpiWorld(&rank, &size)) {
    l.mpi = true;
    l.num_procs = size;
    l.proc_rank = rank;
    l.local_proc_rank = mpiLocalRank(rank);
  }
  if (l.proc_rank >= l.num_procs) return "process rank out of range";
  l.threads = o.threads > 0 ? o.threads : 1;
  if (o.ranks_per_gpu > 1) return resolveSharedGpuLayout(o, num_devices, l, layout);
  if (o.gpus > 0) {
    l.gpus_per_thread = o.gpus;
  } else if (l.num_procs > 1) {
    l.gpus_per_thread = 1;
  } else {
    l.gpus_per_thread = std::max(1, num_devices / l.threads);
  }
  const int first = l.firstDevice(), count = l.ranksPerProc();
  if (first + count > num_devices) {
    std::ostringstream os;
    os << "process " << l.proc_rank << " (local index " << l.local_proc_rank << ") needs GPUs " << first << ".."
       << first + count - 1 << " but only " << num_devices << " are visible";
    return os.str();
  }
  *layout = l;
  return "";
}

std::string prepareRendezvous(const RankLayout& layout) {
  if (layout.num_procs <= 1) return "";
  if (std::getenv("NCCL_COMM_ID") != nullptr) return "";
  if (layout.spawned) return "NCCL_COMM_ID is not set in a --procs child";
  int world = 0, unused = 0;
  mpiWorld(&unused, &world);
  const char* job = nullptr;
  for (const char* name : {"OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "SLURM_JOB_ID", "PMI_JOBID"})
    if (job == nullptr && std::getenv(name) != nullptr) job = std::getenv(name);
  if (mpiLocalSize() == world && job != nullptr) {
    uint64_t h = 1469598103934665603ull;
    for (const char* c = job; *c; ++c) h = (h ^ static_cast<unsigned char>(*c)) * 1099511628211ull;
    const std::string id = "127.0.0.1:" + std::to_string(20000 + h % 20000);
    ::setenv("NCCL_COMM_ID", id.c_str(), 1);
    return "";
  }
  return "several processes need NCCL_COMM_ID=<address of the host of rank 0>:<free port> for the rendezvous "
         "(e.g. mpirun -x NCCL_COMM_ID=node0:29500 ...)";
}

int spawnProcesses(int num_procs, int argc, char** argv) {
  char exe[4096];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) {
    std::fprintf(stderr, "moe-perf: cannot find my own executable (/proc/self/exe)\n");
    return 1;
  }
  exe[n] = '\0';
  std::string comm_id;
  if (const char* v = std::getenv("NCCL_COMM_ID")) {
    comm_id = v;
  } else {
    const int port = freeLocalPort();
    if (port <= 0) {
      std::fprintf(stderr, "moe-perf: cannot find a free TCP port on 127.0.0.1 for NCCL_COMM_ID\n");
      return 1;
    }
    comm_id = "127.0.0.1:" + std::to_string(port);
  }
  std::printf("# moe-perf: spawning %d processes, rendezvous NCCL_COMM_ID=%s\n", num_procs, comm_id.c_str());
  std::fflush(stdout);

  std::vector<pid_t> pids;
  for (int p = 0; p < num_procs; ++p) {
    std::vector<std::string> env;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string kv = *e;
      if (kv.rfind(std::string(kEnvProcRank) + "=", 0) == 0 || kv.rfind(std::string(kEnvNumProcs) + "=", 0) == 0 ||
          kv.rfind("NCCL_COMM_ID=", 0) == 0)
        continue;
      env.push_back(kv);
    }
    env.push_back(std::string(kEnvProcRank) + "=" + std::to_string(p));
    env.push_back(std::string(kEnvNumProcs) + "=" + std::to_string(num_procs));
    env.push_back("NCCL_COMM_ID=" + comm_id);
    std::vector<char*> envp;
    for (auto& kv : env) envp.push_back(kv.data());
    envp.push_back(nullptr);
    std::vector<char*> args(argv, argv + argc);
    args.push_back(nullptr);
    pid_t pid = 0;
    const int rc = ::posix_spawn(&pid, exe, nullptr, nullptr, args.data(), envp.data());
    if (rc != 0) {
      std::fprintf(stderr, "moe-perf: posix_spawn of process %d failed: %s\n", p, std::strerror(rc));
      for (pid_t q : pids) ::kill(q, SIGTERM);
      for (pid_t q : pids) ::waitpid(q, nullptr, 0);
      return 1;
    }
    pids.push_back(pid);
  }

  int worst = 0;
  size_t alive = pids.size();
  std::vector<bool> done(pids.size(), false);
  bool failed = false;
  auto fail_time = std::chrono::steady_clock::now();
  bool terminated = false;
  while (alive > 0) {
    bool progressed = false;
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int status = 0;
      const pid_t r = ::waitpid(pids[i], &status, WNOHANG);
      if (r == 0) continue;
      done[i] = true;
      --alive;
      progressed = true;
      int code = 1;
      if (r > 0 && WIFEXITED(status)) code = WEXITSTATUS(status);
      if (r > 0 && WIFSIGNALED(status)) code = 128 + WTERMSIG(status);
      if (code != 0) {
        std::fprintf(stderr, "moe-perf: process %zu exited with code %d\n", i, code);
        if (!failed) fail_time = std::chrono::steady_clock::now();
        failed = true;
      }
      worst = std::max(worst, code);
    }
    if (failed && !terminated && alive > 0 && std::chrono::steady_clock::now() - fail_time > std::chrono::seconds(20)) {
      std::fprintf(stderr, "moe-perf: terminating the %zu remaining processes\n", alive);
      for (size_t i = 0; i < pids.size(); ++i)
        if (!done[i]) ::kill(pids[i], SIGTERM);
      terminated = true;
    }
    if (!progressed) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return worst;
}

}  // namespace nccl_moe::perf
