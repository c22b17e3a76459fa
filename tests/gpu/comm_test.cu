// Communicator tests on GPUs. Worlds of R = 2, 4 and 8 ranks (tests/gpu/gpu_world.h): threads with one rank per
// GPU over ncclCommInitAll + ncclMoeCommInit, or all ranks on GPU 0 through ncclMoeCommInitAll; and processes
// (copies of this binary rendezvousing through NCCL_COMM_ID, tests/gpu/procs.h), one per GPU, or all on GPU 0 with a
// distinct NCCL_HOSTID each (NCCL then accepts them) and one NCCL_MOE_HOSTID (NCCL-MoE sees one node and maps the
// peers through CUDA IPC on the same device). Checked: stores through every peer pointer, init -> destroy 100x
// without leaking device memory, a config mismatch or a bad config on one rank agreed by all (nobody hangs), several
// nodes refused with a message naming the missing scale-out transport when NCCL_MOE_NET is not emulated (processes
// with their own NCCL_HOSTID, and threads split into virtual nodes by NCCL_MOE_EMULATE_NODES, which processes
// refuse), and ncclMoeCommInitAll's own arguments and SM split. Virtual nodes WITH the software NIC:
// scaleout_init_test.cu; processes as nodes with it (NCCL_MOE_NET=emulated): net_procs_test.cc.
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/bootstrap.h"
#include "core/comm.h"
#include "core/error.h"
#include "gpu_world.h"
#include "harness/scoped_env.h"
#include "nccl_moe.h"
#include "procs.h"

namespace {

using gpu_test::Placement;
using gpu_test::World;
using procs_test::allExitedZero;
using procs_test::ChildRank;
using procs_test::noExtra;
using procs_test::spawnRanks;

#define CUDA_OK(x) ASSERT_EQ(cudaSuccess, (x)) << #x
#define MOE_OK(x) ASSERT_EQ(ncclSuccess, (x)) << #x << ": " << ncclMoeGetLastError(nullptr)

ncclMoeConfig_t smallConfig() {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = 16;
  c.hidden = 256;
  c.max_topk = 4;
  c.max_tokens_per_rank = 64;
  c.ll_max_tokens_per_rank = 8;
  return c;
}

// Each rank writes (source rank + 1) * 1000 + word into a window of every peer's buffer reserved for it.
__global__ void writePeers(nccl_moe::DeviceComm comm, size_t window_offset, int words) {
  for (int peer = 0; peer < comm.num_ranks; ++peer) {
    int* dst = reinterpret_cast<int*>(comm.scaleup.buffer[peer] + window_offset) + comm.rank * words;
    for (int i = threadIdx.x; i < words; i += blockDim.x) dst[i] = (comm.rank + 1) * 1000 + i;
  }
  __threadfence_system();
}

// The window at the end of the buffer (unused by any op here): rank r writes its words into every peer, then
// `all_written()` (a barrier over the ranks) and every rank checks what every peer wrote into its own buffer.
template <typename Barrier>
void runPeerStoreCheck(ncclMoeComm_t comm, int num_ranks, cudaStream_t stream, Barrier all_written) {
  const int words = 256;
  const size_t window = comm->layout.total_bytes - static_cast<size_t>(num_ranks) * words * sizeof(int);
  writePeers<<<1, 256, 0, stream>>>(comm->deviceComm(), window, words);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaStreamSynchronize(stream));
  all_written();
  std::vector<int> host(static_cast<size_t>(num_ranks) * words);
  CUDA_OK(cudaMemcpy(host.data(), comm->buffer + window, host.size() * sizeof(int), cudaMemcpyDeviceToHost));
  for (int src = 0; src < num_ranks; ++src)
    for (int i = 0; i < words; ++i)
      ASSERT_EQ((src + 1) * 1000 + i, host[src * words + i]) << "rank " << comm->rank << " from " << src;
}

// ---- Threads ----

class CommWorld : public ::testing::TestWithParam<int> {};

TEST_P(CommWorld, InitStoresThroughEveryPeerPointer) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  const ncclMoeConfig_t config = smallConfig();
  world.runWithComms(config, [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    int rank = -1, count = 0, dev = -1;
    MOE_OK(ncclMoeCommRank(comm, &rank));
    MOE_OK(ncclMoeCommCount(comm, &count));
    MOE_OK(ncclMoeCommCuDevice(comm, &dev));
    EXPECT_EQ(r, rank);
    EXPECT_EQ(n, count);
    EXPECT_EQ(world.device(r), dev);
    size_t bytes = 0;
    ncclMoeConfig_t c = config;
    MOE_OK(ncclMoeGetBufferSize(&c, n, &bytes));
    EXPECT_EQ(bytes, comm->layout.total_bytes);
    // One node; every peer reached over the nvlink transport; ranks sharing GPU 0 split its SMs.
    EXPECT_EQ(1, comm->nodes.num_nodes);
    EXPECT_EQ(r, comm->localRank());
    for (int p = 0; p < n; ++p)
      EXPECT_EQ(p == r ? nccl_moe::Transport::kSelf : nccl_moe::Transport::kNvlink, comm->transport[p]);
    EXPECT_EQ(world.sharedGpu() ? n : 1, comm->ranks_on_device);
    EXPECT_EQ(world.rankSms(), comm->rank_sms);
    world.barrier().wait();  // every rank's buffer is mapped and idle before anyone writes
    runPeerStoreCheck(comm, n, stream, [&] { world.barrier().wait(); });
    world.barrier().wait();  // nobody destroys while a peer still reads
  });
}

TEST_P(CommWorld, InitDestroyHundredTimesLeaksNothing) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  World world(n, placement);
  ASSERT_TRUE(world.ok());
  ncclMoeConfig_t config = smallConfig();
  std::vector<size_t> free_before(n), free_after(n);
  auto cycle = [&](int r) {
    if (world.sharedGpu()) {
      if (r != 0) return;  // one InitAll creates every rank; destroy is not collective
      std::vector<ncclMoeComm_t> comms(n);
      const std::vector<int> devs(n, 0);
      MOE_OK(ncclMoeCommInitAll(comms.data(), n, devs.data(), &config));
      ncclMoeHandle_t handle = nullptr;
      MOE_OK(ncclMoeHandleCreate(comms[0], &handle));
      MOE_OK(ncclMoeHandleDestroy(handle));
      for (int i = n - 1; i >= 0; --i) MOE_OK(ncclMoeCommDestroy(comms[i]));  // any order
    } else {
      ncclMoeComm_t comm = nullptr;
      MOE_OK(ncclMoeCommInit(&comm, world.nccl(r), &config));
      ncclMoeHandle_t handle = nullptr;
      MOE_OK(ncclMoeHandleCreate(comm, &handle));
      MOE_OK(ncclMoeHandleDestroy(handle));
      MOE_OK(ncclMoeCommDestroy(comm));
    }
  };
  world.run([&](int r) {
    cycle(r);  // warm-up: the first init pays one-time allocations (peer mappings, NCCL buffers)
    size_t total = 0;
    CUDA_OK(cudaDeviceSynchronize());
    world.barrier().wait();
    CUDA_OK(cudaMemGetInfo(&free_before[r], &total));
    world.barrier().wait();
    for (int i = 0; i < 100; ++i) cycle(r);
    CUDA_OK(cudaDeviceSynchronize());
    world.barrier().wait();
    CUDA_OK(cudaMemGetInfo(&free_after[r], &total));
  });
  for (int r = 0; r < n; ++r) {
    // Allow 2 MiB of allocator noise (device-side caches); a leaked buffer would be far larger per init.
    EXPECT_LE(free_before[r], free_after[r] + (2u << 20)) << "rank " << r;
  }
}

// A rank whose thread has the wrong current device: it fails its local checks, still joins the identity exchange,
// and every other rank fails naming it (two GPUs needed: on one GPU every rank's device is the current one).
TEST(CommGpu, LocalFailureOnOneRankIsAgreedNotHung) {
  const int n = std::min(gpu_test::gpuCount(), NCCL_MOE_MAX_NVL_PEERS);
  if (n < 2) GTEST_SKIP() << "needs 2 GPUs (a wrong current device), found " << n;
  World world(n, Placement::kOnePerGpu);
  ASSERT_TRUE(world.ok());
  std::vector<ncclResult_t> results(n);
  std::vector<std::string> messages(n);
  int device_after = -1;
  world.run([&](int r) {
    if (r == 1) CUDA_OK(cudaSetDevice(0));
    ncclMoeConfig_t config = smallConfig();
    ncclMoeComm_t comm = nullptr;
    results[r] = ncclMoeCommInit(&comm, world.nccl(r), &config);
    messages[r] = ncclMoeGetLastError(nullptr);
    EXPECT_EQ(nullptr, comm);
    if (r == 1) cudaGetDevice(&device_after);
  });
  EXPECT_EQ(ncclInvalidUsage, results[1]);
  EXPECT_NE(std::string::npos, messages[1].find("cudaSetDevice(1)")) << messages[1];
  for (int r = 0; r < n; ++r) {
    if (r == 1) continue;
    EXPECT_EQ(ncclRemoteError, results[r]) << "rank " << r;
    EXPECT_NE(std::string::npos, messages[r].find("rank 1 failed its local setup")) << messages[r];
  }
  EXPECT_EQ(0, device_after) << "init must leave the caller's current device as it found it";
}

TEST(CommGpu, WrongCurrentDeviceIsRejected) {
  const int n = gpu_test::gpuCount();
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

// ---- ncclMoeCommInitAll's own arguments and the SM split of ranks sharing a GPU ----

TEST(CommInitAll, RejectsBadArgumentsBeforeAnyRankStarts) {
  if (gpu_test::gpuCount() < 1) GTEST_SKIP() << "needs a GPU";
  ncclMoeConfig_t config = smallConfig();
  std::vector<ncclMoeComm_t> comms(2, reinterpret_cast<ncclMoeComm_t>(0x1));
  const int bad_devices[2] = {0, 999};
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(comms.data(), 2, bad_devices, &config));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("devices[1] is 999"))
      << ncclMoeGetLastError(nullptr);
  EXPECT_EQ(nullptr, comms[0]);
  EXPECT_EQ(nullptr, comms[1]);
  const int devices[2] = {0, 0};
  ncclMoeConfig_t odd = config;
  odd.num_experts = 15;  // not a multiple of 2 ranks: every rank's local check fails
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(comms.data(), 2, devices, &odd));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("num_experts = 15"))
      << ncclMoeGetLastError(nullptr);
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(comms.data(), 0, devices, &config));
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(comms.data(), 2, devices, nullptr));
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(nullptr, 2, devices, &config));
  ncclMoeConfig_t too_many_per_node = config;
  too_many_per_node.num_experts = 2 * (NCCL_MOE_MAX_NVL_PEERS + 1);
  std::vector<ncclMoeComm_t> many(NCCL_MOE_MAX_NVL_PEERS + 1);
  const std::vector<int> zeros(many.size(), 0);
  EXPECT_EQ(ncclInvalidUsage,
            ncclMoeCommInitAll(many.data(), static_cast<int>(many.size()), zeros.data(), &too_many_per_node));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("NCCL_MOE_MAX_NVL_PEERS"))
      << ncclMoeGetLastError(nullptr);
}

// Four ranks on GPU 0: each rank's HT calls accept at most SMs/4; a larger budget is refused before anything is
// sent, with a message saying why, on every rank.
TEST(CommInitAll, RanksSharingAGpuSplitItsSms) {
  if (gpu_test::gpuCount() < 1) GTEST_SKIP() << "needs a GPU";
  const int n = 4;
  World world(n, Placement::kOneGpu);
  const int sms = world.rankSms();
  ncclMoeConfig_t config = smallConfig();
  world.runWithComms(config, [&](int r, ncclMoeComm_t comm, cudaStream_t stream) {
    EXPECT_EQ(n, comm->ranks_on_device);
    EXPECT_EQ(sms, comm->rank_sms);
    EXPECT_LE(comm->default_num_sms, sms);
    ncclMoeHandle_t handle = nullptr;
    MOE_OK(ncclMoeHandleCreate(comm, &handle));
    harness::DeviceArray<int64_t> idx(8);
    idx.fill(0xff);  // all slots -1: nothing is routed
    int num_recv = -1;
    ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
    na.topk_idx = idx.get();
    na.num_tokens = 2;
    na.topk = 4;
    na.num_recv_tokens = &num_recv;
    world.barrier().wait();
    EXPECT_EQ(ncclSuccess, ncclMoeDispatchNotify(comm, handle, &na, stream)) << ncclMoeGetLastError(comm);
    EXPECT_EQ(0, num_recv);
    harness::DeviceBytes x(4096), rx(4096);
    ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
    da.x = x.get();
    da.hidden = 256;
    da.recv_x = rx.get();
    da.num_sms = sms + 1;
    EXPECT_EQ(ncclInvalidArgument, ncclMoeDispatch(comm, handle, &da, stream));
    const std::string msg = ncclMoeGetLastError(comm);
    EXPECT_NE(std::string::npos, msg.find("4 ranks share this GPU")) << msg;
    world.barrier().wait();
    MOE_OK(ncclMoeHandleDestroy(handle));
  });
}

// ---- Processes: the parent spawns copies of this binary, each running one of the (disabled) child tests ----

// ncclMoeCommInit over the child's communicator is refused (ncclInvalidUsage, no communicator) with a message that
// contains every one of `fragments`.
void expectInitRefused(const ChildRank& child, const std::vector<std::string>& fragments) {
  ncclMoeConfig_t config = smallConfig();
  ncclMoeComm_t comm = nullptr;
  EXPECT_EQ(ncclInvalidUsage, ncclMoeCommInit(&comm, child.nccl, &config));
  const std::string msg = ncclMoeGetLastError(nullptr);
  for (const std::string& f : fragments) EXPECT_NE(std::string::npos, msg.find(f)) << f << " not in: " << msg;
  EXPECT_EQ(nullptr, comm);
}

TEST_P(CommWorld, ProcessesShareBuffersThroughCudaIpc) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  EXPECT_TRUE(allExitedZero(spawnRanks(n, "CommGpuChild.DISABLED_IpcChild", noExtra), n));
}

TEST(CommGpuChild, DISABLED_IpcChild) {
  ChildRank child;
  ASSERT_TRUE(child.init()) << "runs as a child of CommWorld.ProcessesShareBuffersThroughCudaIpc";
  ncclMoeConfig_t config = smallConfig();
  ncclMoeComm_t comm = nullptr;
  MOE_OK(ncclMoeCommInit(&comm, child.nccl, &config));
  for (int r = 0; r < child.size; ++r) {
    if (r != child.rank) EXPECT_TRUE(comm->nvl.via_ipc[r]) << "peer " << r << " should be mapped through CUDA IPC";
  }
  EXPECT_EQ(1, comm->nodes.num_nodes);
  cudaStream_t stream = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  runPeerStoreCheck(comm, child.size, stream, [&] { child.barrier(); });
  cudaStreamDestroy(stream);
  MOE_OK(ncclMoeCommDestroy(comm));
}

// Rank 1's config differs: every rank returns ncclInvalidArgument naming the difference.
TEST_P(CommWorld, MismatchedConfigIsRejectedOnEveryRank) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  EXPECT_TRUE(allExitedZero(spawnRanks(n, "CommGpuChild.DISABLED_MismatchChild", noExtra), n));
}

TEST(CommGpuChild, DISABLED_MismatchChild) {
  ChildRank child;
  ASSERT_TRUE(child.init());
  ncclMoeConfig_t config = smallConfig();
  if (child.rank == 1) config.hidden = 512;
  ncclMoeComm_t comm = nullptr;
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInit(&comm, child.nccl, &config));
  EXPECT_NE(std::string::npos, std::string(ncclMoeGetLastError(nullptr)).find("config differs"))
      << ncclMoeGetLastError(nullptr);
  EXPECT_EQ(nullptr, comm);
}

// Rank 1's config fails the argument check (num_sms < 0): it still joins the exchange; the others fail naming it.
TEST_P(CommWorld, BadConfigOnOneRankIsAgreedNotHung) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  EXPECT_TRUE(allExitedZero(spawnRanks(n, "CommGpuChild.DISABLED_BadConfigChild", noExtra), n));
}

TEST(CommGpuChild, DISABLED_BadConfigChild) {
  ChildRank child;
  ASSERT_TRUE(child.init());
  ncclMoeConfig_t config = smallConfig();
  if (child.rank == 1) config.num_sms = -1;
  ncclMoeComm_t comm = nullptr;
  const ncclResult_t res = ncclMoeCommInit(&comm, child.nccl, &config);
  const std::string msg = ncclMoeGetLastError(nullptr);
  EXPECT_EQ(nullptr, comm);
  if (child.rank == 1) {
    EXPECT_EQ(ncclInvalidArgument, res);
    EXPECT_NE(std::string::npos, msg.find("num_sms")) << msg;
  } else {
    EXPECT_EQ(ncclRemoteError, res);
    EXPECT_NE(std::string::npos, msg.find("rank 1 failed its local setup")) << msg;
  }
}

// Every process its own node (NCCL_MOE_HOSTID empty, distinct NCCL_HOSTID): several nodes need the scale-out
// transport; with NCCL_MOE_NET=auto there is none (no verbs backend yet): every rank refuses with a message that
// says so and names NCCL_MOE_NET=emulated.
TEST_P(CommWorld, SeveralNodesAreRefusedNamingTheScaleOutTransport) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  const auto own_node = [](int r) {
    return std::vector<std::string>{"NCCL_MOE_HOSTID=", "NCCL_HOSTID=vnode" + std::to_string(r), "NCCL_MOE_NET="};
  };
  EXPECT_TRUE(allExitedZero(spawnRanks(n, "CommGpuChild.DISABLED_SeveralNodesChild", own_node), n));
}

TEST(CommGpuChild, DISABLED_SeveralNodesChild) {
  ChildRank child;
  ASSERT_TRUE(child.init());
  expectInitRefused(child, {"form " + std::to_string(child.size) + " nodes", "scale-out", "NCCL_MOE_NET=emulated"});
}

// ---- Virtual nodes (NCCL_MOE_EMULATE_NODES) ----

struct RankOutcome {
  ncclResult_t result = ncclInternalError;
  std::string message;
};

// n ranks as threads on GPU 0 over the in-process world, as ncclMoeCommInitAll runs them, but keeping every rank's
// own result and message (ncclMoeCommInitAll returns one). For failures only: the communicators are released.
std::vector<RankOutcome> initFailingWorldOnGpu0(int n, const ncclMoeConfig_t& config) {
  std::vector<std::unique_ptr<nccl_moe::Bootstrap>> bootstraps(n);
  EXPECT_EQ(ncclSuccess, nccl_moe::makeWorldBootstraps(n, 30ull * 1000000000ull, bootstraps.data()));
  std::vector<RankOutcome> out(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      if (cudaSetDevice(0) != cudaSuccess) return;
      nccl_moe::clearThreadLastError();
      auto* comm = new ncclMoeComm();
      out[r].result = nccl_moe::commInit(comm, std::move(bootstraps[r]), 0, config, ncclSuccess);
      out[r].message = nccl_moe::threadLastError();
      nccl_moe::releaseCommResources(comm);
      delete comm;
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

// 4 ranks on GPU 0 split into 2 virtual nodes need the scale-out transport; without NCCL_MOE_NET=emulated there
// is none (no verbs backend yet): every rank refuses, naming the nodes, the missing transport and
// NCCL_MOE_NET=emulated (with it, the same world works: scaleout_init_test.cu). 3 nodes do not divide 4 ranks: every
// rank refuses naming both. 1 node: init works.
TEST(CommEmulatedNodes, TwoVirtualNodesOnGpu0AreRefusedOnEveryRankNamingTheScaleOutTransport) {
  if (gpu_test::gpuCount() < 1) GTEST_SKIP() << "needs a GPU";
  const int n = 4;
  if (gpu_test::deviceSms(0) / n < gpu_test::kMinSmsPerRank) GTEST_SKIP() << "too few SMs for 4 ranks on GPU 0";
  const ncclMoeConfig_t config = smallConfig();
  harness::ScopedEnv net("NCCL_MOE_NET", nullptr);
  {
    harness::ScopedEnv emulate("NCCL_MOE_EMULATE_NODES", "2");
    const std::vector<RankOutcome> outcomes = initFailingWorldOnGpu0(n, config);
    for (int r = 0; r < n; ++r) {
      EXPECT_EQ(ncclInvalidUsage, outcomes[r].result) << "rank " << r << ": " << outcomes[r].message;
      EXPECT_NE(std::string::npos, outcomes[r].message.find("form 2 nodes")) << outcomes[r].message;
      EXPECT_NE(std::string::npos, outcomes[r].message.find("node 0: ranks 0 1; node 1: ranks 2 3"))
          << outcomes[r].message;
      EXPECT_NE(std::string::npos, outcomes[r].message.find("NCCL_MOE_EMULATE_NODES=2")) << outcomes[r].message;
      EXPECT_NE(std::string::npos, outcomes[r].message.find("scale-out")) << outcomes[r].message;
      EXPECT_NE(std::string::npos, outcomes[r].message.find("NCCL_MOE_NET=emulated")) << outcomes[r].message;
    }
    // The public entry point says the same.
    std::vector<ncclMoeComm_t> comms(n, nullptr);
    const std::vector<int> devices(n, 0);
    ncclMoeConfig_t c = config;
    EXPECT_EQ(ncclInvalidUsage, ncclMoeCommInitAll(comms.data(), n, devices.data(), &c));
    const std::string msg = ncclMoeGetLastError(nullptr);
    EXPECT_NE(std::string::npos, msg.find("form 2 nodes")) << msg;
    EXPECT_NE(std::string::npos, msg.find("scale-out")) << msg;
    for (ncclMoeComm_t comm : comms) EXPECT_EQ(nullptr, comm);
  }
  {
    harness::ScopedEnv emulate("NCCL_MOE_EMULATE_NODES", "3");
    const std::vector<RankOutcome> outcomes = initFailingWorldOnGpu0(n, config);
    for (int r = 0; r < n; ++r) {
      EXPECT_EQ(ncclInvalidArgument, outcomes[r].result) << "rank " << r << ": " << outcomes[r].message;
      EXPECT_NE(std::string::npos, outcomes[r].message.find("NCCL_MOE_EMULATE_NODES=3")) << outcomes[r].message;
      EXPECT_NE(std::string::npos, outcomes[r].message.find("the 4 ranks")) << outcomes[r].message;
    }
  }
  {
    harness::ScopedEnv emulate("NCCL_MOE_EMULATE_NODES", "1");
    std::vector<ncclMoeComm_t> comms(n, nullptr);
    const std::vector<int> devices(n, 0);
    ncclMoeConfig_t c = config;
    MOE_OK(ncclMoeCommInitAll(comms.data(), n, devices.data(), &c));
    for (ncclMoeComm_t comm : comms) {
      EXPECT_EQ(1, comm->nodes.num_nodes);
      EXPECT_EQ(1, comm->nodes.emulated_nodes);
    }
    for (ncclMoeComm_t comm : comms) MOE_OK(ncclMoeCommDestroy(comm));
  }
}

// The same over NCCL communicators whose ranks are threads of this process (ncclCommInitAll, one rank per GPU):
// they are one process too, so the variable applies.
TEST(CommEmulatedNodes, NcclCommunicatorOfThreadsIsSplitToo) {
  const int n = 4;
  if (gpu_test::gpuCount() < n) GTEST_SKIP() << "needs " << n << " GPUs, found " << gpu_test::gpuCount();
  harness::ScopedEnv emulate("NCCL_MOE_EMULATE_NODES", "2");
  harness::ScopedEnv net("NCCL_MOE_NET", nullptr);
  World world(n, Placement::kOnePerGpu);
  ASSERT_TRUE(world.ok());
  std::vector<RankOutcome> outcomes(n);
  world.run([&](int r) {
    ncclMoeConfig_t config = smallConfig();
    ncclMoeComm_t comm = nullptr;
    outcomes[r].result = ncclMoeCommInit(&comm, world.nccl(r), &config);
    outcomes[r].message = ncclMoeGetLastError(nullptr);
    EXPECT_EQ(nullptr, comm);
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(ncclInvalidUsage, outcomes[r].result) << "rank " << r;
    EXPECT_NE(std::string::npos, outcomes[r].message.find("form 2 nodes")) << outcomes[r].message;
    EXPECT_NE(std::string::npos, outcomes[r].message.find("scale-out")) << outcomes[r].message;
  }
}

// Ranks in several processes: NCCL_MOE_EMULATE_NODES is refused on every rank, pointing at NCCL_HOSTID.
TEST_P(CommWorld, EmulatedNodesAcrossProcessesAreRefused) {
  const int n = GetParam();
  Placement placement;
  GPU_WORLD_OR_SKIP(n, &placement);
  const auto emulate = [](int) { return std::vector<std::string>{"NCCL_MOE_EMULATE_NODES=2"}; };
  EXPECT_TRUE(allExitedZero(spawnRanks(n, "CommGpuChild.DISABLED_EmulatedNodesChild", emulate), n));
}

TEST(CommGpuChild, DISABLED_EmulatedNodesChild) {
  ChildRank child;
  ASSERT_TRUE(child.init());
  expectInitRefused(child, {"live in " + std::to_string(child.size) + " processes", "NCCL_HOSTID"});
}

INSTANTIATE_TEST_SUITE_P(Ranks, CommWorld, ::testing::ValuesIn(gpu_test::rankCounts()), gpu_test::ranksName);

}  // namespace
