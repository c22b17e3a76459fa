// The tuner plugin inside a real NCCL: a child copy of this binary (fresh process, because NCCL reads its
// environment and loads its tuner once per process) sets NCCL_TUNER_PLUGIN=<libnccl-tuner-moe.so>,
// NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=INIT,TUNING, NCCL_DEBUG_FILE=<tmp> and NCCL_MOE_SM_RESERVE=<SMs - 4>
// before its first NCCL call, creates one communicator over 1-2 GPUs with ncclCommInitAll, runs an all-reduce,
// checks its result and destroys the communicators. The parent then reads NCCL's log and checks that NCCL
// loaded the plugin, the plugin's init ran on every rank, and (with 2 GPUs, since NCCL never consults the
// tuner for a 1-rank communicator) that getCollInfo was consulted and NCCL used at most 4 channels.
// With ENABLE_EXPORTS on this binary (or NCCL_MOE_SHARED_LIB_PATH defined) it also checks the bridge: the
// communicator registry and a line logged through pluginLogger() landing in NCCL's debug file.
// Skips without a GPU or without NCCL_MOE_PLUGIN_PATH.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <nccl.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/plugin_bridge.h"

extern char** environ;

namespace {

constexpr const char* kChildMarker = "NCCL_MOE_PLUGIN_GPU_CHILD_LOG";
constexpr int kCapChannels = 4;
constexpr size_t kCount = size_t{1} << 20;  // floats per rank: 4 MiB, far above the size rule's 4 KiB/channel

#ifdef NCCL_MOE_PLUGIN_PATH
constexpr const char* kPluginPath = NCCL_MOE_PLUGIN_PATH;
#else
constexpr const char* kPluginPath = nullptr;
#endif

int gpuCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

std::vector<std::string> readLines(const std::string& path) {
  std::vector<std::string> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

int countContaining(const std::vector<std::string>& lines, const std::string& needle) {
  int n = 0;
  for (const std::string& l : lines) n += l.find(needle) != std::string::npos;
  return n;
}

// ---- child ---------------------------------------------------------------------------------------------

#define CHILD_CUDA(x) ASSERT_EQ(cudaSuccess, (x)) << #x
#define CHILD_NCCL(x) ASSERT_EQ(ncclSuccess, (x)) << #x

TEST(PluginGpuChild, DISABLED_AllReduceThroughTuner) {
  const char* log_path = getenv(kChildMarker);
  if (log_path == nullptr || kPluginPath == nullptr) GTEST_SKIP() << "only run by PluginGpu.LoadedAndConsulted";
  const int num_gpus = std::min(2, gpuCount());
  ASSERT_GE(num_gpus, 1);
  int sms = 0;
  CHILD_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  // Everything NCCL and the plugin read must be in place before the first NCCL call of this process.
  setenv("NCCL_TUNER_PLUGIN", kPluginPath, 1);
  setenv("NCCL_DEBUG", "INFO", 1);
  setenv("NCCL_DEBUG_SUBSYS", "INIT,TUNING", 1);
  setenv("NCCL_DEBUG_FILE", log_path, 1);
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  setenv("NCCL_MOE_SM_RESERVE", std::to_string(sms - kCapChannels).c_str(), 1);

  const bool exported = dlsym(RTLD_DEFAULT, NCCL_MOE_PLUGIN_ATTACH_SYMBOL) != nullptr;
  bool library_loaded = exported;
#ifdef NCCL_MOE_SHARED_LIB_PATH
  // The RTLD_LOCAL case (Python loads extension libraries that way): the plugin finds it by name.
  if (!exported) library_loaded = dlopen(NCCL_MOE_SHARED_LIB_PATH, RTLD_NOW | RTLD_LOCAL) != nullptr;
#endif

  std::vector<int> devices(num_gpus);
  for (int i = 0; i < num_gpus; ++i) devices[i] = i;
  std::vector<ncclComm_t> comms(num_gpus);
  CHILD_NCCL(ncclCommInitAll(comms.data(), num_gpus, devices.data()));

  if (exported) {
    nccl_moe::RegisteredComm rc;
    EXPECT_EQ(1, nccl_moe::findRegisteredComms(num_gpus, -1, &rc));
    EXPECT_EQ(1, nccl_moe::findRegisteredComms(num_gpus, num_gpus - 1, nullptr)) << "device not recorded";
    EXPECT_EQ(num_gpus, rc.num_ranks);
    EXPECT_EQ(1, rc.num_nodes);
    EXPECT_EQ(num_gpus, rc.num_local_ranks);
    ncclMoeNcclLogger_t logger = nccl_moe::pluginLogger();
    ASSERT_NE(nullptr, logger);
    logger(nccl_moe::kNcclLogInfo, nccl_moe::kNcclSubsysInit, __FILE__, __LINE__,
           "NCCL-MoE bridge check: registry has comm %#lx", static_cast<unsigned long>(rc.comm_hash));
  }

  std::vector<float*> bufs(num_gpus);
  std::vector<cudaStream_t> streams(num_gpus);
  std::vector<float> host(kCount);
  for (int r = 0; r < num_gpus; ++r) {
    CHILD_CUDA(cudaSetDevice(r));
    CHILD_CUDA(cudaMalloc(&bufs[r], kCount * sizeof(float)));
    CHILD_CUDA(cudaStreamCreate(&streams[r]));
    for (size_t i = 0; i < kCount; ++i) host[i] = static_cast<float>((r + 1) * (i % 7));
    CHILD_CUDA(cudaMemcpy(bufs[r], host.data(), kCount * sizeof(float), cudaMemcpyHostToDevice));
  }
  CHILD_NCCL(ncclGroupStart());
  for (int r = 0; r < num_gpus; ++r) {
    CHILD_NCCL(ncclAllReduce(bufs[r], bufs[r], kCount, ncclFloat, ncclSum, comms[r], streams[r]));
  }
  CHILD_NCCL(ncclGroupEnd());
  const float rank_sum = static_cast<float>(num_gpus * (num_gpus + 1) / 2);
  for (int r = 0; r < num_gpus; ++r) {
    CHILD_CUDA(cudaSetDevice(r));
    CHILD_CUDA(cudaStreamSynchronize(streams[r]));
    CHILD_CUDA(cudaMemcpy(host.data(), bufs[r], kCount * sizeof(float), cudaMemcpyDeviceToHost));
    size_t wrong = 0;
    for (size_t i = 0; i < kCount; ++i) wrong += host[i] != rank_sum * static_cast<float>(i % 7);
    EXPECT_EQ(0u, wrong) << "rank " << r;
    CHILD_CUDA(cudaFree(bufs[r]));
    CHILD_CUDA(cudaStreamDestroy(streams[r]));
  }
  for (ncclComm_t c : comms) CHILD_NCCL(ncclCommDestroy(c));
  if (exported) {
    EXPECT_FALSE(nccl_moe::pluginAttached());  // detached with the last communicator
  }
  std::ofstream(std::string(log_path) + ".child")
      << "exported=" << exported << " library_loaded=" << library_loaded << "\n";
  std::printf("child: gpus=%d sms=%d exported=%d library_loaded=%d\n", num_gpus, sms, exported, library_loaded);
}

// ---- parent --------------------------------------------------------------------------------------------

TEST(PluginGpu, LoadedAndConsulted) {
  if (kPluginPath == nullptr) GTEST_SKIP() << "NCCL_MOE_PLUGIN_PATH not defined by the build";
  const int gpus = gpuCount();
  if (gpus < 1) GTEST_SKIP() << "needs a GPU";
  const int num_gpus = std::min(2, gpus);

  char dir[] = "/tmp/moe_tuner_gpu_XXXXXX";
  ASSERT_NE(nullptr, mkdtemp(dir));
  const std::string log_path = std::string(dir) + "/nccl.log";
  const std::string marker = std::string(kChildMarker) + "=" + log_path;

  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
  env_strings.push_back(marker);
  std::vector<char*> envp;
  for (std::string& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string exe = "/proc/self/exe";
  std::string also = "--gtest_also_run_disabled_tests";
  std::string filter = "--gtest_filter=PluginGpuChild.DISABLED_AllReduceThroughTuner";
  char* argv[] = {exe.data(), also.data(), filter.data(), nullptr};
  pid_t pid = 0;
  ASSERT_EQ(0, posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv, envp.data()));
  int status = 0;
  ASSERT_EQ(pid, waitpid(pid, &status, 0));
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child failed (status " << status << ")";

  const std::vector<std::string> lines = readLines(log_path);
  ASSERT_FALSE(lines.empty()) << "NCCL wrote no log to " << log_path;
  EXPECT_GE(countContaining(lines, "TUNER/Plugin: Using NCCL-MoE"), 1) << "NCCL did not load the tuner";
  EXPECT_EQ(num_gpus, countContaining(lines, "NCCL-MoE tuner: init comm"));
  EXPECT_EQ(num_gpus, countContaining(lines, "NCCL-MoE tuner: finalize comm"));
  EXPECT_EQ(0, countContaining(lines, "different libnccl copies"));
  // What the child could attach to: the bridge inside this executable (exported) or libnccl_moe.so.
  const std::vector<std::string> child = readLines(log_path + ".child");
  ASSERT_EQ(1u, child.size()) << "child wrote no status";
  const bool exported = child[0].find("exported=1") != std::string::npos;
  const bool library_loaded = child[0].find("library_loaded=1") != std::string::npos;
  EXPECT_EQ(library_loaded ? num_gpus : 0, countContaining(lines, "libnccl_moe attached"));
  EXPECT_EQ(exported ? 1 : 0, countContaining(lines, "NCCL-MoE bridge check: registry has comm"));

  if (num_gpus >= 2) {
    // "... finalize comm 0x..: consulted N times, channels capped M times"
    unsigned long consulted = 0, capped = 0;
    for (const std::string& l : lines) {
      const size_t at = l.find("consulted ");
      if (l.find("NCCL-MoE tuner: finalize comm") == std::string::npos || at == std::string::npos) continue;
      unsigned long n = 0, m = 0;
      if (std::sscanf(l.c_str() + at, "consulted %lu times, channels capped %lu times", &n, &m) == 2) {
        consulted += n;
        capped += m;
      }
    }
    EXPECT_GE(consulted, 1ul) << "getCollInfo never called";
    EXPECT_GE(capped, 1ul) << "the reserve did not cap any collective";
    // NCCL (rank 0) logs "AllReduce: <bytes> Bytes -> Algo X proto Y channel{Lo..Hi}={lo..hi}".
    int checked = 0;
    for (const std::string& l : lines) {
      const size_t at = l.find("channel{Lo..Hi}={");
      if (l.find("AllReduce: ") == std::string::npos || at == std::string::npos) continue;
      int lo = -1, hi = -1;
      ASSERT_EQ(2, std::sscanf(l.c_str() + at, "channel{Lo..Hi}={%d..%d}", &lo, &hi)) << l;
      EXPECT_LT(hi, kCapChannels) << l;
      ++checked;
    }
    EXPECT_GE(checked, 1) << "no AllReduce TUNING line in " << log_path;
  } else {
    std::printf("one GPU: NCCL does not consult the tuner for a 1-rank communicator; checked loading only\n");
  }
  for (const std::string& l : lines) {
    if (l.find("NCCL-MoE") != std::string::npos || l.find("TUNER") != std::string::npos) {
      std::printf("  %s\n", l.c_str());
    }
  }
  unlink(log_path.c_str());
  unlink((log_path + ".child").c_str());
  rmdir(dir);
}

}  // namespace
