// Communicator tests on real GPUs: collective init over ncclCommInitAll (one thread per GPU, peer access)
// and over separate processes (CUDA IPC, spawned copies of this binary rendezvousing through NCCL_COMM_ID),
// stores through every peer pointer, init -> destroy 100x without leaking device memory, config mismatch.
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "core/comm.h"
#include "nccl_moe.h"

extern char** environ;

namespace {

#define CUDA_OK(x) ASSERT_EQ(cudaSuccess, (x)) << #x
#define NCCL_OK(x) ASSERT_EQ(ncclSuccess, (x)) << #x << ": " << ncclMoeGetLastError(nullptr)

int gpuCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

ncclMoeConfig_t smallConfig() {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = 16;
  c.hidden = 256;
  c.max_topk = 4;
  c.max_tokens_per_rank = 64;
  c.ll_max_tokens_per_rank = 8;
  return c;
}

// Each rank writes (source rank + 1) * 1000 + word into a window of every peer's buffer reserved for it;
// after a barrier each rank checks what every peer wrote into its own buffer.
__global__ void writePeers(nccl_moe::DeviceComm comm, size_t window_offset, int words) {
  for (int peer = 0; peer < comm.num_ranks; ++peer) {
    int* dst = reinterpret_cast<int*>(comm.scaleup.buffer[peer] + window_offset) + comm.rank * words;
    for (int i = threadIdx.x; i < words; i += blockDim.x) dst[i] = (comm.rank + 1) * 1000 + i;
  }
  __threadfence_system();
}

void runPeerStoreCheck(ncclMoeComm_t comm, int num_ranks, ncclComm_t nccl) {
  const int words = 256;
  // The last bytes of the buffer: unused by any op in this test.
  const size_t window = comm->layout.total_bytes - static_cast<size_t>(num_ranks) * words * sizeof(int);
  writePeers<<<1, 256>>>(comm->deviceComm(), window, words);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  int* flag = nullptr;
  CUDA_OK(cudaMalloc(&flag, sizeof(int)));
  ASSERT_EQ(ncclSuccess, ncclAllReduce(flag, flag, 1, ncclInt32, ncclSum, nccl, 0));
  CUDA_OK(cudaDeviceSynchronize());
  cudaFree(flag);
  std::vector<int> host(static_cast<size_t>(num_ranks) * words);
  CUDA_OK(cudaMemcpy(host.data(), comm->buffer + window, host.size() * sizeof(int), cudaMemcpyDeviceToHost));
  for (int src = 0; src < num_ranks; ++src)
    for (int i = 0; i < words; ++i)
      ASSERT_EQ((src + 1) * 1000 + i, host[src * words + i]) << "rank " << comm->rank << " from " << src;
}

template <typename Fn>
void forEachRank(int n, Fn fn) {
  std::vector<ncclComm_t> nccl(n);
  std::vector<int> devs(n);
  for (int i = 0; i < n; ++i) devs[i] = i;
  ASSERT_EQ(ncclSuccess, ncclCommInitAll(nccl.data(), n, devs.data()));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      cudaSetDevice(r);
      fn(r, nccl[r]);
    });
  }
  for (auto& t : threads) t.join();
  for (auto c : nccl) ncclCommDestroy(c);
}

TEST(CommGpu, ThreadsInitStoresThroughEveryPeerPointer) {
  const int n = gpuCount();
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  forEachRank(n, [&](int r, ncclComm_t nccl) {
    ncclMoeConfig_t config = smallConfig();
    ncclMoeComm_t comm = nullptr;
    NCCL_OK(ncclMoeCommInit(&comm, nccl, &config));
    int rank = -1, count = 0, dev = -1;
    NCCL_OK(ncclMoeCommRank(comm, &rank));
    NCCL_OK(ncclMoeCommCount(comm, &count));
    NCCL_OK(ncclMoeCommCuDevice(comm, &dev));
    EXPECT_EQ(r, rank);
    EXPECT_EQ(n, count);
    EXPECT_EQ(r, dev);
    size_t bytes = 0;
    NCCL_OK(ncclMoeGetBufferSize(&config, n, &bytes));
    EXPECT_EQ(bytes, comm->layout.total_bytes);
    runPeerStoreCheck(comm, n, nccl);
    NCCL_OK(ncclMoeCommDestroy(comm));
  });
}

TEST(CommGpu, InitDestroyHundredTimesLeaksNothing) {
  const int n = gpuCount();
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  std::vector<size_t> free_before(n), free_after(n);
  forEachRank(n, [&](int r, ncclComm_t nccl) {
    ncclMoeConfig_t config = smallConfig();
    // Warm-up: the first init pays one-time allocations (peer mappings, NCCL buffers).
    ncclMoeComm_t comm = nullptr;
    NCCL_OK(ncclMoeCommInit(&comm, nccl, &config));
    NCCL_OK(ncclMoeCommDestroy(comm));
    size_t total = 0;
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaMemGetInfo(&free_before[r], &total));
    for (int i = 0; i < 100; ++i) {
      NCCL_OK(ncclMoeCommInit(&comm, nccl, &config));
      ncclMoeHandle_t handle = nullptr;
      NCCL_OK(ncclMoeHandleCreate(comm, &handle));
      NCCL_OK(ncclMoeHandleDestroy(handle));
      NCCL_OK(ncclMoeCommDestroy(comm));
    }
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaMemGetInfo(&free_after[r], &total));
  });
  for (int r = 0; r < n; ++r) {
    // Allow 2 MiB of allocator noise (device-side caches); a leaked buffer would be far larger per init.
    EXPECT_LE(free_before[r], free_after[r] + (2u << 20)) << "rank " << r;
  }
}

TEST(CommGpu, MismatchedConfigIsRejectedOnEveryRank) {
  const int n = gpuCount();
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  std::vector<ncclResult_t> results(n);
  std::vector<std::string> messages(n);
  forEachRank(n, [&](int r, ncclComm_t nccl) {
    ncclMoeConfig_t config = smallConfig();
    if (r == 1) config.hidden = 512;
    ncclMoeComm_t comm = nullptr;
    results[r] = ncclMoeCommInit(&comm, nccl, &config);
    messages[r] = ncclMoeGetLastError(nullptr);
    EXPECT_EQ(nullptr, comm);
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(ncclInvalidArgument, results[r]);
    EXPECT_NE(std::string::npos, messages[r].find("config differs")) << messages[r];
  }
}

TEST(CommGpu, WrongCurrentDeviceIsRejected) {
  const int n = gpuCount();
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  ncclComm_t nccl = nullptr;
  int dev = 0;
  ASSERT_EQ(ncclSuccess, ncclCommInitAll(&nccl, 1, &dev));
  CUDA_OK(cudaSetDevice(1));
  ncclMoeConfig_t config = smallConfig();
  ncclMoeComm_t comm = nullptr;
  EXPECT_EQ(ncclInvalidUsage, ncclMoeCommInit(&comm, nccl, &config));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("cudaSetDevice(0)"));
  CUDA_OK(cudaSetDevice(0));
  ncclCommDestroy(nccl);
}

// Init where rank 1 alone is broken by `breakRank1(&config)` (which may also change the thread's current device):
// rank 1 must return `expected` with `needle` in its message, every other rank ncclRemoteError naming rank 1, and
// nobody may hang (the failed rank still joins the identity exchange). Returns rank 1's current device afterwards.
template <typename Break>
int initWithRank1Broken(int n, Break breakRank1, ncclResult_t expected, const char* needle) {
  std::vector<ncclResult_t> results(n);
  std::vector<std::string> messages(n);
  int device_after = -1;
  forEachRank(n, [&](int r, ncclComm_t nccl) {
    ncclMoeConfig_t config = smallConfig();
    if (r == 1) breakRank1(&config);
    ncclMoeComm_t comm = nullptr;
    results[r] = ncclMoeCommInit(&comm, nccl, &config);
    messages[r] = ncclMoeGetLastError(nullptr);
    EXPECT_EQ(nullptr, comm);
    if (r == 1) cudaGetDevice(&device_after);
  });
  EXPECT_EQ(expected, results[1]);
  EXPECT_NE(std::string::npos, messages[1].find(needle)) << messages[1];
  for (int r = 0; r < n; ++r) {
    if (r == 1) continue;
    EXPECT_EQ(ncclRemoteError, results[r]) << "rank " << r;
    EXPECT_NE(std::string::npos, messages[r].find("rank 1 failed its local setup")) << messages[r];
  }
  return device_after;
}

// A failure of one rank's local setup (here: its thread's current device is wrong).
TEST(CommGpu, LocalFailureOnOneRankIsAgreedNotHung) {
  const int n = gpuCount();
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  const int device_after = initWithRank1Broken(
      n, [](ncclMoeConfig_t*) { CUDA_OK(cudaSetDevice(0)); }, ncclInvalidUsage, "cudaSetDevice(1)");
  EXPECT_EQ(0, device_after) << "init must leave the caller's current device as it found it";
}

// A config that fails the argument check on one rank only (num_sms < 0).
TEST(CommGpu, BadConfigOnOneRankIsAgreedNotHung) {
  const int n = gpuCount();
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  initWithRank1Broken(
      n, [](ncclMoeConfig_t* c) { c->num_sms = -1; }, ncclInvalidArgument, "num_sms");
}

// ---- Processes: the parent spawns one copy of this binary per GPU; each child runs IpcChild below. ----

TEST(CommGpu, ProcessesShareBuffersThroughCudaIpc) {
  const int n = gpuCount();
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs, found " << n;
  if (std::getenv("NCCL_MOE_TEST_CHILD_RANK") != nullptr) GTEST_SKIP() << "child process";
  char self[4096] = {0};
  ASSERT_GT(readlink("/proc/self/exe", self, sizeof(self) - 1), 0);
  const std::string port = std::to_string(20000 + (getpid() % 20000));
  std::vector<pid_t> children;
  for (int r = 0; r < n; ++r) {
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
    env_strings.push_back("NCCL_MOE_TEST_CHILD_RANK=" + std::to_string(r));
    env_strings.push_back("NCCL_MOE_TEST_CHILD_SIZE=" + std::to_string(n));
    env_strings.push_back("NCCL_COMM_ID=127.0.0.1:" + port);
    std::vector<char*> envp;
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string filter = "--gtest_filter=CommGpuChild.IpcChild";
    char* argv[] = {self, filter.data(), nullptr};
    pid_t pid = 0;
    ASSERT_EQ(0, posix_spawn(&pid, self, nullptr, nullptr, argv, envp.data()));
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(pid, waitpid(pid, &status, 0));
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child exit status " << status;
  }
}

TEST(CommGpuChild, IpcChild) {
  const char* rank_env = std::getenv("NCCL_MOE_TEST_CHILD_RANK");
  if (rank_env == nullptr) GTEST_SKIP() << "runs only as a child of ProcessesShareBuffersThroughCudaIpc";
  const int rank = std::atoi(rank_env);
  const int n = std::atoi(std::getenv("NCCL_MOE_TEST_CHILD_SIZE"));
  CUDA_OK(cudaSetDevice(rank));
  ncclUniqueId id;
  NCCL_OK(ncclGetUniqueId(&id));  // with NCCL_COMM_ID set every process derives the same id
  ncclComm_t nccl = nullptr;
  NCCL_OK(ncclCommInitRank(&nccl, n, id, rank));
  ncclMoeConfig_t config = smallConfig();
  ncclMoeComm_t comm = nullptr;
  NCCL_OK(ncclMoeCommInit(&comm, nccl, &config));
  for (int r = 0; r < n; ++r) {
    if (r != rank) EXPECT_TRUE(comm->nvl.via_ipc[r]) << "peer " << r << " should be mapped through CUDA IPC";
  }
  runPeerStoreCheck(comm, n, nccl);
  NCCL_OK(ncclMoeCommDestroy(comm));
  ncclCommDestroy(nccl);
}

}  // namespace
