// Ranks as processes in the GPU tests (comm_test.cu, net_procs_test.cc): a parent test spawns copies of this binary,
// each running one (disabled) child test as one rank, and checks how they exit; the child joins an NCCL
// communicator over NCCL_COMM_ID (ChildRank) and runs its rank's side of the test.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "gpu_world.h"

extern char** environ;

namespace procs_test {

// How long spawnRanks waits for its children before it kills the ones still running (and fails naming them).
constexpr double kChildTimeoutS = 180.0;

// Spawns n copies of this binary running `child_test`, with rank/size/device in the environment
// (NCCL_MOE_TEST_CHILD_RANK/SIZE/DEVICE) and NCCL_COMM_ID; rank r uses GPU r when there are n GPUs, else GPU 0 with
// NCCL_HOSTID=vnode<r> (NCCL accepts several ranks on one GPU only from distinct hosts) and one NCCL_MOE_HOSTID for
// all. `extra(r)` adds variables ("NAME=value"); its values win over these defaults (NCCL_MOE_TEST_CHILD_DEVICE=0
// puts every rank on GPU 0 whatever the GPU count). Waits at most `timeout_s`: a child still running then is killed
// (SIGKILL) and the calling test fails naming its rank. Returns each child's wait status, in rank order.
template <typename Extra>
std::vector<int> spawnRanks(int n, const char* child_test, Extra extra, double timeout_s = kChildTimeoutS) {
  char self[4096] = {0};
  if (readlink("/proc/self/exe", self, sizeof(self) - 1) <= 0) return {};
  const std::string port = std::to_string(20000 + (getpid() % 20000));
  const bool one_gpu = gpu_test::gpuCount() < n;
  std::vector<pid_t> children;
  for (int r = 0; r < n; ++r) {
    // The parent's environment without the variables set below (getenv would return the first of two entries).
    const std::vector<std::string> extras = extra(r);
    auto overridden = [&](const std::string& entry) {
      const std::string name = entry.substr(0, entry.find('=') + 1);
      if (name == "NCCL_COMM_ID=" || name == "NCCL_HOSTID=" || name == "NCCL_MOE_HOSTID=" ||
          name.rfind("NCCL_MOE_TEST_CHILD_", 0) == 0)
        return true;
      for (const std::string& x : extras)
        if (x.rfind(name, 0) == 0) return true;
      return false;
    };
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e)
      if (!overridden(*e)) env_strings.emplace_back(*e);
    std::vector<std::string> vars = extras;  // the caller's values win over the defaults that follow
    vars.push_back("NCCL_MOE_TEST_CHILD_RANK=" + std::to_string(r));
    vars.push_back("NCCL_MOE_TEST_CHILD_SIZE=" + std::to_string(n));
    vars.push_back("NCCL_MOE_TEST_CHILD_DEVICE=" + std::to_string(one_gpu ? 0 : r));
    vars.push_back("NCCL_COMM_ID=127.0.0.1:" + port);
    if (one_gpu) {
      vars.push_back("NCCL_HOSTID=vnode" + std::to_string(r));
      vars.push_back("NCCL_MOE_HOSTID=one-gpu-test");
    }
    for (const std::string& v : vars) {
      bool set = false;
      for (const std::string& e : env_strings) set = set || e.rfind(v.substr(0, v.find('=') + 1), 0) == 0;
      if (!set) env_strings.push_back(v);
    }
    std::vector<char*> envp;
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string filter = std::string("--gtest_filter=") + child_test;
    std::string disabled = "--gtest_also_run_disabled_tests";
    char* argv[] = {self, filter.data(), disabled.data(), nullptr};
    pid_t pid = 0;
    if (posix_spawn(&pid, self, nullptr, nullptr, argv, envp.data()) != 0) break;
    children.push_back(pid);
  }
  std::vector<int> statuses(children.size(), -1);
  std::vector<bool> done(children.size(), false);
  size_t running = children.size();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (running > 0) {
    for (size_t i = 0; i < children.size(); ++i) {
      if (done[i]) continue;
      int status = -1;
      const pid_t w = waitpid(children[i], &status, WNOHANG);
      if (w == 0) continue;
      statuses[i] = w == children[i] ? status : -1;
      done[i] = true;
      --running;
    }
    if (running == 0) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      for (size_t i = 0; i < children.size(); ++i) {
        if (done[i]) continue;
        ADD_FAILURE() << child_test << ": child rank " << i << " (pid " << children[i] << ") still running after "
                      << timeout_s << " s: killed (it hung)";
        kill(children[i], SIGKILL);
        int status = -1;
        waitpid(children[i], &status, 0);
        statuses[i] = status;
        done[i] = true;
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return statuses;
}

inline bool allExitedZero(const std::vector<int>& statuses, int n) {
  if (static_cast<int>(statuses.size()) != n) return false;
  for (int s : statuses)
    if (!WIFEXITED(s) || WEXITSTATUS(s) != 0) return false;
  return true;
}

// "rank 0: exit 0, rank 1: exit 1, rank 2: killed by signal 9", for a failure message.
inline std::string describeExits(const std::vector<int>& statuses) {
  std::string out;
  for (size_t r = 0; r < statuses.size(); ++r) {
    const int s = statuses[r];
    out += (r > 0 ? ", rank " : "rank ") + std::to_string(r) + ": ";
    if (WIFEXITED(s))
      out += "exit " + std::to_string(WEXITSTATUS(s));
    else if (WIFSIGNALED(s))
      out += "killed by signal " + std::to_string(WTERMSIG(s));
    else
      out += "status " + std::to_string(s);
  }
  return out.empty() ? "no child was spawned" : out;
}

inline std::vector<std::string> noExtra(int) { return {}; }

// A child's rank, size and NCCL communicator (over NCCL_COMM_ID).
struct ChildRank {
  int rank = -1, size = 0;
  ncclComm_t nccl = nullptr;
  bool init() {
    const char* rank_env = std::getenv("NCCL_MOE_TEST_CHILD_RANK");
    if (rank_env == nullptr) return false;
    rank = std::atoi(rank_env);
    size = std::atoi(std::getenv("NCCL_MOE_TEST_CHILD_SIZE"));
    if (cudaSetDevice(std::atoi(std::getenv("NCCL_MOE_TEST_CHILD_DEVICE"))) != cudaSuccess) return false;
    ncclUniqueId id;
    if (ncclGetUniqueId(&id) != ncclSuccess) return false;  // with NCCL_COMM_ID every process derives the same id
    return ncclCommInitRank(&nccl, size, id, rank) == ncclSuccess;
  }
  // A barrier over the NCCL communicator.
  void barrier() {
    int* flag = nullptr;
    cudaMalloc(&flag, sizeof(int));
    ncclAllReduce(flag, flag, 1, ncclInt32, ncclSum, nccl, 0);
    cudaStreamSynchronize(0);
    cudaFree(flag);
  }
  // The sum of every rank's `value` (a barrier too); -1 when the reduction itself failed.
  int sum(int value) {
    int* d = nullptr;
    if (cudaMalloc(&d, sizeof(int)) != cudaSuccess) return -1;
    int out = -1;
    if (cudaMemcpy(d, &value, sizeof(int), cudaMemcpyHostToDevice) == cudaSuccess &&
        ncclAllReduce(d, d, 1, ncclInt32, ncclSum, nccl, 0) == ncclSuccess && cudaStreamSynchronize(0) == cudaSuccess)
      cudaMemcpy(&out, d, sizeof(int), cudaMemcpyDeviceToHost);
    cudaFree(d);
    return out;
  }
  ~ChildRank() {
    if (nccl != nullptr) ncclCommDestroy(nccl);
  }
};

}  // namespace procs_test
