// Multi-node communicators on one GPU (virtual nodes) with the software NIC as scale-out transport
// (NCCL_MOE_NET=emulated; src/transport/emulated/comm_transport.h, docs/transport.md "Communicator init"):
//
//   Shapes/ScaleoutInit.InitAndDestroyTwentyTimes            2x1 and 2x2 worlds (ncclMoeCommInitAll on GPU 0 with
//                                                            NCCL_MOE_EMULATE_NODES): init -> checks -> destroy, 20x,
//                                                            free device memory does not shrink
//   Shapes/ScaleoutInit.PutSignalReachesEveryRemotePeer      chaos on; a kernel per rank, through
//                                                            DeviceComm::scaleout.peers only, put_signals a pattern
//                                                            into every remote-node peer's buffer, on the QP set
//                                                            (me + peer) % 2, so both sets carry data; each peer waits
//                                                            for the signal and checks the bytes on the GPU; the host
//                                                            checks that own-node ranks received nothing
//   Shapes/ScaleoutInit.HtCallsCheckTheirArguments           HT calls with empty arguments fail before anything is
//                                                            launched; buffer-size queries work (the HT and LL calls
//                                                            run: tests/gpu/ht_net_test.cc, ll_net_test.cc)
//   ScaleoutRefusal.NetUnsetRefusesNamingTheEmulatedNic      NCCL_MOE_NET unset: refused, the message names
//                                                            NCCL_MOE_NET=emulated
//   ScaleoutRefusal.NetDisagreementFailsOnEveryRank          ranks of one world read different NCCL_MOE_NET values
//                                                            (commInit's override): every rank fails naming both
//   ScaleoutRefusal.UnknownNetModeIsRefused                  NCCL_MOE_NET_MODE=gda: refused naming the accepted modes
//                                                            (proxy and dbproxy run: tests/gpu/ll_net_test.cc,
//                                                            ht_net_test.cc)
//
// Every device wait is bounded (kTimeoutNs) and every host wait too; a GPU-less machine skips every test.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/bootstrap.h"
#include "core/comm.h"
#include "core/error.h"
#include "device/ptx.cuh"
#include "gpu_world.h"
#include "harness/scoped_env.h"
#include "nccl_moe.h"
#include "transport/rdma/ibgda/ibgda.cuh"
#include "transport/scaleout_table.h"

namespace {

namespace ib = nccl_moe::ibgda;
namespace dev = nccl_moe::dev;
using nccl_moe::ScaleoutPeer;

// The software NIC's transport of a communicator built with NCCL_MOE_NET=emulated.
nccl_moe::emulated::CommTransport& emu(ncclMoeComm_t c) {
  return static_cast<nccl_moe::emulated::CommTransport&>(*c->net_transport);
}

#define CUDA_OK(x) ASSERT_EQ(cudaSuccess, (x)) << #x
#define MOE_OK(x) ASSERT_EQ(ncclSuccess, (x)) << #x << ": " << ncclMoeGetLastError(nullptr)

constexpr uint64_t kTimeoutNs = 20ull * 1000 * 1000 * 1000;
constexpr double kHostTimeoutS = 60.0;
constexpr uint32_t kMsgBytes = 4096;  // per (source, destination) pair

ncclMoeConfig_t smallConfig() {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.num_experts = 16;
  c.hidden = 256;
  c.max_topk = 4;
  c.max_tokens_per_rank = 64;
  c.ll_max_tokens_per_rank = 8;
  return c;
}

struct Shape {
  int nodes;
  int per_node;
  int ranks() const { return nodes * per_node; }
};
void PrintTo(const Shape& s, std::ostream* os) { *os << s.nodes << "x" << s.per_node; }
std::string shapeName(const ::testing::TestParamInfo<Shape>& info) {
  return std::to_string(info.param.nodes) + "x" + std::to_string(info.param.per_node);
}

// The environment of an emulated world of `s`.
struct EmulatedEnv {
  explicit EmulatedEnv(const Shape& s)
      : nodes_text(std::to_string(s.nodes)),
        net("NCCL_MOE_NET", "emulated"),
        mode("NCCL_MOE_NET_MODE", nullptr),
        emulate("NCCL_MOE_EMULATE_NODES", nodes_text.c_str()) {}
  std::string nodes_text;
  harness::ScopedEnv net, mode, emulate;
};

std::string skipReason(const Shape& s) {
  if (gpu_test::gpuCount() < 1) return "needs a GPU";
  if (gpu_test::deviceSms(0) / s.ranks() < gpu_test::kMinSmsPerRank) return "too few SMs for the ranks on GPU 0";
  return "";
}

// All ranks of `s` on GPU 0; "" or what failed.
std::string initWorld(const Shape& s, std::vector<ncclMoeComm_t>* comms) {
  const int R = s.ranks();
  comms->assign(R, nullptr);
  const std::vector<int> devices(R, 0);
  ncclMoeConfig_t c = smallConfig();
  if (ncclMoeCommInitAll(comms->data(), R, devices.data(), &c) != ncclSuccess)
    return std::string("ncclMoeCommInitAll: ") + ncclMoeGetLastError(nullptr);
  return "";
}

std::string destroyWorld(std::vector<ncclMoeComm_t>* comms) {
  std::string why;
  for (ncclMoeComm_t& c : *comms) {
    if (c != nullptr && ncclMoeCommDestroy(c) != ncclSuccess && why.empty())
      why = std::string("ncclMoeCommDestroy: ") + ncclMoeGetLastError(nullptr);
    c = nullptr;
  }
  return why;
}

// ---- The put_signal kernel ----

// Offsets of the test's region at the end of every rank's buffer (no operation runs, so nothing else uses it):
//   src  [R][kMsgBytes]  this rank's message to destination d at src + d * kMsgBytes
//   dst  [R][kMsgBytes]  the message from source s lands at dst + s * kMsgBytes
//   sig  [R] uint64      source s adds 1 to sig + 8 * s after its message
struct Region {
  uint64_t src, dst, sig, end;
};
Region regionOf(uint64_t total_bytes, int R) {
  const uint64_t bytes = 2ull * R * kMsgBytes + 8ull * R;
  Region r;
  r.src = (total_bytes - bytes) / 256 * 256;
  r.dst = r.src + static_cast<uint64_t>(R) * kMsgBytes;
  r.sig = r.dst + static_cast<uint64_t>(R) * kMsgBytes;
  r.end = r.sig + 8ull * R;
  return r;
}

__host__ __device__ inline uint32_t patternWord(int src, int dst, uint32_t word) {
  uint32_t z = 0x9e3779b9u * static_cast<uint32_t>(src * 131 + dst * 7 + 1) ^ (word * 0x85ebca6bu);
  z ^= z >> 15;
  return z * 0xc2b2ae35u + word;
}

struct PutStatus {
  int failed;      // 0 ok, 1 a signal wait timed out, 2 a transport call returned false
  int peer;        // the peer it concerned
  int mismatches;  // message words that differ from the pattern (all remote sources)
  int checked;     // remote sources whose message was checked
};

struct PutArgs {
  nccl_moe::DeviceComm comm;
  uint8_t* buffer;  // this rank's own buffer (local source and receive region)
  Region region;
  PutStatus* status;  // mapped host memory
};

// One thread: put_signal to every remote-node peer (table only), quiet each QP, then wait for every remote
// source's signal and compare its message word by word.
__global__ void putSignalEveryRemotePeer(PutArgs a) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const int R = a.comm.num_ranks;
  const int me = a.comm.rank;
  const ScaleoutPeer* table = a.comm.scaleout.peers;
  for (int p = 0; p < R; ++p) {
    const ScaleoutPeer& e = table[p];
    if (!e.valid) continue;
    const uint64_t local = reinterpret_cast<uint64_t>(a.buffer + a.region.src + static_cast<uint64_t>(p) * kMsgBytes);
    const uint64_t remote = e.remote_base + a.region.dst + static_cast<uint64_t>(me) * kMsgBytes;
    const uint64_t sig = e.remote_base + a.region.sig + 8ull * me;
    if (!ib::put_signal(e.qp[(me + p) % 2], local, remote, e.rkey, kMsgBytes, sig, e.rkey, 1)) {
      atomicCAS(&a.status->failed, 0, 2);
      a.status->peer = p;
      return;
    }
  }
  for (int p = 0; p < R; ++p) {
    if (!table[p].valid) continue;
    if (!ib::quiet(table[p].qp[(me + p) % 2])) {
      atomicCAS(&a.status->failed, 0, 2);
      a.status->peer = p;
      return;
    }
  }
  for (int s = 0; s < R; ++s) {
    if (!table[s].valid) continue;  // own-node ranks send nothing here
    const uint64_t* sig = reinterpret_cast<const uint64_t*>(a.buffer + a.region.sig + 8ull * s);
    const uint64_t start = dev::globaltimer_ns();
    while (dev::ld_acquire_sys(sig) < 1) {
      if (dev::globaltimer_ns() - start > kTimeoutNs) {
        atomicCAS(&a.status->failed, 0, 1);
        a.status->peer = s;
        return;
      }
    }
    const uint32_t* msg =
        reinterpret_cast<const uint32_t*>(a.buffer + a.region.dst + static_cast<uint64_t>(s) * kMsgBytes);
    int bad = 0;
    for (uint32_t w = 0; w < kMsgBytes / 4; ++w) bad += msg[w] != patternWord(s, me, w) ? 1 : 0;
    a.status->mismatches += bad;
    a.status->checked += 1;
  }
}

// ---- Tests ----

class ScaleoutInit : public ::testing::TestWithParam<Shape> {};

TEST_P(ScaleoutInit, InitAndDestroyTwentyTimes) {
  const Shape s = GetParam();
  const std::string skip = skipReason(s);
  if (!skip.empty()) GTEST_SKIP() << skip;
  EmulatedEnv env(s);
  CUDA_OK(cudaSetDevice(0));
  const int R = s.ranks();
  size_t free_after_first = 0, free_at_end = 0, total = 0;
  for (int iter = 0; iter < 20; ++iter) {
    std::vector<ncclMoeComm_t> comms;
    ASSERT_EQ("", initWorld(s, &comms)) << "iteration " << iter;
    for (int r = 0; r < R; ++r) {
      ncclMoeComm_t c = comms[r];
      ASSERT_NE(nullptr, c);
      EXPECT_EQ(s.nodes, c->nodes.num_nodes);
      EXPECT_EQ(nccl_moe::NetKind::kEmulated, c->net.kind);
      EXPECT_EQ(nccl_moe::ScaleoutPlan::kEmulated, c->scaleout_plan);
      ASSERT_NE(nullptr, c->net_transport) << "rank " << r;
      EXPECT_EQ(2 * (R - s.per_node), c->net_transport->numQps()) << "rank " << r << ": a QP per (peer, set)";
      EXPECT_TRUE(emu(c).nic().running()) << "rank " << r;
      const nccl_moe::DeviceComm d = c->deviceComm();
      ASSERT_NE(nullptr, d.scaleout.peers);
      std::vector<ScaleoutPeer> table(R);
      CUDA_OK(cudaMemcpy(table.data(), d.scaleout.peers, sizeof(ScaleoutPeer) * R, cudaMemcpyDeviceToHost));
      for (int p = 0; p < R; ++p) {
        const bool remote = c->nodes.node_of[p] != c->nodes.node_of[r];
        EXPECT_EQ(remote ? 1u : 0u, table[p].valid) << "rank " << r << " peer " << p;
        if (!remote) continue;
        for (int set = 0; set < nccl_moe::rdma::kNumQpSets; ++set) {
          EXPECT_EQ(p, table[p].qp[set].peer);
          EXPECT_EQ(r, table[p].qp[set].rank);
        }
        EXPECT_NE(table[p].qp[0].qpn, table[p].qp[1].qpn) << "each set has its own QP";
        EXPECT_EQ(c->layout.total_bytes, table[p].window_bytes);
        // The window the record announced is the peer's buffer as its own registry has it.
        EXPECT_EQ(comms[p]->net_transport->window().rkey, table[p].rkey);
        EXPECT_EQ(comms[p]->net_transport->window().addr, table[p].remote_base);
      }
      // Own-node peers stay reachable through the NVLink table, remote ones only through the scale-out table.
      EXPECT_EQ(s.per_node, d.scaleup.num_local_ranks);
    }
    ASSERT_EQ("", destroyWorld(&comms)) << "iteration " << iter;
    CUDA_OK(cudaDeviceSynchronize());
    // The first iteration pays one-time allocations (module loading, allocator pools); later ones must not grow.
    CUDA_OK(cudaMemGetInfo(iter == 0 ? &free_after_first : &free_at_end, &total));
  }
  // Each rank's transport holds a 64 MiB staging arena: a leaked one is far beyond the allocator's noise.
  EXPECT_LE(free_after_first, free_at_end + (8u << 20)) << "device memory shrank over 19 init/destroy cycles";
}

TEST_P(ScaleoutInit, PutSignalReachesEveryRemotePeer) {
  const Shape s = GetParam();
  const std::string skip = skipReason(s);
  if (!skip.empty()) GTEST_SKIP() << skip;
  EmulatedEnv env(s);
  // Chaos on (the given seed, else a fixed one): the data must be complete when the signal arrives even when the
  // NIC places it in random chunks; the NICs' descriptions in failure messages name the seed.
  const char* given = std::getenv("NCCL_MOE_EMU_CHAOS");
  const std::string seed = given != nullptr && *given != '\0' ? std::string(given) : std::string("0x5ca1ab1e");
  harness::ScopedEnv chaos("NCCL_MOE_EMU_CHAOS", seed.c_str());
  CUDA_OK(cudaSetDevice(0));
  const int R = s.ranks();
  std::vector<ncclMoeComm_t> comms;
  ASSERT_EQ("", initWorld(s, &comms));
  const Region region = regionOf(comms[0]->layout.total_bytes, R);
  ASSERT_LE(region.end, comms[0]->layout.total_bytes);

  PutStatus* host_status = nullptr;
  PutStatus* dev_status = nullptr;
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&host_status), sizeof(PutStatus) * R,
                        cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(host_status, 0, sizeof(PutStatus) * R);
  CUDA_OK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_status), host_status, 0));

  // Sources: rank r's message to d; receive regions and signals zero.
  for (int r = 0; r < R; ++r) {
    std::vector<uint32_t> src(static_cast<size_t>(R) * kMsgBytes / 4);
    for (int d = 0; d < R; ++d)
      for (uint32_t w = 0; w < kMsgBytes / 4; ++w) src[d * (kMsgBytes / 4) + w] = patternWord(r, d, w);
    CUDA_OK(cudaMemcpy(comms[r]->buffer + region.src, src.data(), src.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(comms[r]->buffer + region.dst, 0, region.end - region.dst));
  }
  CUDA_OK(cudaDeviceSynchronize());

  std::vector<cudaStream_t> streams(R, nullptr);
  for (int r = 0; r < R; ++r) CUDA_OK(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking));
  for (int r = 0; r < R; ++r) {
    PutArgs a;
    a.comm = comms[r]->deviceComm();
    a.buffer = comms[r]->buffer;
    a.region = region;
    a.status = dev_status + r;
    putSignalEveryRemotePeer<<<1, 32, 0, streams[r]>>>(a);
    CUDA_OK(cudaGetLastError());
  }
  // Bounded host wait: the device waits end within kTimeoutNs.
  const auto start = std::chrono::steady_clock::now();
  for (bool done = false; !done;) {
    done = true;
    for (int r = 0; r < R; ++r) {
      const cudaError_t e = cudaStreamQuery(streams[r]);
      if (e == cudaErrorNotReady) {
        done = false;
      } else {
        ASSERT_EQ(cudaSuccess, e) << "rank " << r << "'s kernel: " << cudaGetErrorString(e);
      }
    }
    ASSERT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), kHostTimeoutS)
        << "kernels still running";
    if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  for (int r = 0; r < R; ++r) {
    const PutStatus& st = host_status[r];
    const std::string what = "rank " + std::to_string(r) + " (" + comms[r]->net_transport->describe() + ")";
    EXPECT_EQ(0, st.failed) << what << ": peer " << st.peer << "; " << ncclMoeGetLastError(comms[r]);
    EXPECT_EQ(R - s.per_node, st.checked) << what;
    EXPECT_EQ(0, st.mismatches) << what;
  }
  // Host view: every remote source's signal is 1 and its message intact; own-node sources left zeros.
  for (int d = 0; d < R; ++d) {
    std::vector<uint32_t> dst(static_cast<size_t>(R) * kMsgBytes / 4);
    std::vector<uint64_t> sig(R);
    CUDA_OK(cudaMemcpy(dst.data(), comms[d]->buffer + region.dst, dst.size() * 4, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(sig.data(), comms[d]->buffer + region.sig, 8ull * R, cudaMemcpyDeviceToHost));
    for (int s_rank = 0; s_rank < R; ++s_rank) {
      const bool remote = comms[d]->nodes.node_of[s_rank] != comms[d]->nodes.node_of[d];
      EXPECT_EQ(remote ? 1u : 0u, sig[s_rank]) << "rank " << d << " from " << s_rank;
      int bad = 0;
      for (uint32_t w = 0; w < kMsgBytes / 4; ++w)
        bad += dst[s_rank * (kMsgBytes / 4) + w] != (remote ? patternWord(s_rank, d, w) : 0u) ? 1 : 0;
      EXPECT_EQ(0, bad) << "rank " << d << " from " << s_rank;
    }
    ncclResult_t async = ncclSuccess;
    EXPECT_EQ(ncclSuccess, ncclMoeCommGetAsyncError(comms[d], &async));
    EXPECT_EQ(ncclSuccess, async) << ncclMoeGetLastError(comms[d]);
    EXPECT_FALSE(emu(comms[d]).backend().failed()) << emu(comms[d]).backend().error();
  }
  for (cudaStream_t st : streams) cudaStreamDestroy(st);
  cudaFreeHost(host_status);
  ASSERT_EQ("", destroyWorld(&comms));
}

TEST_P(ScaleoutInit, HtCallsCheckTheirArguments) {
  const Shape s = GetParam();
  const std::string skip = skipReason(s);
  if (!skip.empty()) GTEST_SKIP() << skip;
  EmulatedEnv env(s);
  CUDA_OK(cudaSetDevice(0));
  std::vector<ncclMoeComm_t> comms;
  ASSERT_EQ("", initWorld(s, &comms));
  ncclMoeComm_t c = comms[0];
  ncclMoeHandle_t h = nullptr;
  MOE_OK(ncclMoeHandleCreate(c, &h));
  ncclMoeNotifyArgs_t notify = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  ncclMoeDispatchArgs_t dispatch = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  ncclMoeCombineArgs_t combine = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
  const std::vector<std::pair<std::string, ncclResult_t>> results = {
      {"ncclMoeDispatchNotify", ncclMoeDispatchNotify(c, h, &notify, nullptr)},
      {"ncclMoeDispatch", ncclMoeDispatch(c, h, &dispatch, nullptr)},
      {"ncclMoeCombine", ncclMoeCombine(c, h, &combine, nullptr)},
  };
  // The internode HT kernels take these calls; arguments left empty are refused before anything is launched.
  for (const auto& r : results) EXPECT_NE(ncclSuccess, r.second) << r.first;
  const std::string msg = ncclMoeGetLastError(c);
  EXPECT_EQ(0u, msg.find("ncclMoeCombine: ")) << msg;
  size_t bytes = 0;
  ncclMoeConfig_t config = smallConfig();
  MOE_OK(ncclMoeGetBufferSize(&config, s.per_node, &bytes));
  EXPECT_GT(bytes, 0u);
  MOE_OK(ncclMoeHandleDestroy(h));
  ASSERT_EQ("", destroyWorld(&comms));
}

INSTANTIATE_TEST_SUITE_P(Shapes, ScaleoutInit, ::testing::Values(Shape{2, 1}, Shape{2, 2}), shapeName);

TEST(ScaleoutRefusal, NetUnsetRefusesNamingTheEmulatedNic) {
  const Shape s{2, 1};
  const std::string skip = skipReason(s);
  if (!skip.empty()) GTEST_SKIP() << skip;
  harness::ScopedEnv net("NCCL_MOE_NET", nullptr);
  harness::ScopedEnv emulate("NCCL_MOE_EMULATE_NODES", "2");
  CUDA_OK(cudaSetDevice(0));
  std::vector<ncclMoeComm_t> comms(2, nullptr);
  const std::vector<int> devices(2, 0);
  ncclMoeConfig_t c = smallConfig();
  EXPECT_EQ(ncclInvalidUsage, ncclMoeCommInitAll(comms.data(), 2, devices.data(), &c));
  const std::string msg = ncclMoeGetLastError(nullptr);
  EXPECT_NE(std::string::npos, msg.find("form 2 nodes")) << msg;
  EXPECT_NE(std::string::npos, msg.find("NCCL_MOE_NET=auto")) << msg;
  EXPECT_NE(std::string::npos, msg.find("NCCL_MOE_NET=emulated")) << msg;
  for (ncclMoeComm_t comm : comms) EXPECT_EQ(nullptr, comm);
}

// Threads cannot read different environments, so each rank's choice comes through commInit's override, as an
// NCCL_MOE_NET read differently per process would arrive in the identity exchange.
TEST(ScaleoutRefusal, NetDisagreementFailsOnEveryRank) {
  const Shape s{2, 1};
  const std::string skip = skipReason(s);
  if (!skip.empty()) GTEST_SKIP() << skip;
  harness::ScopedEnv emulate("NCCL_MOE_EMULATE_NODES", "2");
  const int n = 2;
  std::vector<std::unique_ptr<nccl_moe::Bootstrap>> bootstraps(n);
  ASSERT_EQ(ncclSuccess, nccl_moe::makeWorldBootstraps(n, 30ull * 1000000000ull, bootstraps.data()));
  const nccl_moe::NetChoice choices[2] = {{nccl_moe::NetKind::kEmulated, nccl_moe::NetMode::kIbgda},
                                          {nccl_moe::NetKind::kAuto, nccl_moe::NetMode::kIbgda}};
  std::vector<ncclResult_t> results(n, ncclSuccess);
  std::vector<std::string> messages(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      if (cudaSetDevice(0) != cudaSuccess) return;
      nccl_moe::clearThreadLastError();
      auto* comm = new ncclMoeComm();
      results[r] = nccl_moe::commInit(comm, std::move(bootstraps[r]), 0, smallConfig(), ncclSuccess, &choices[r]);
      messages[r] = nccl_moe::threadLastError();
      nccl_moe::releaseCommResources(comm);
      delete comm;
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(ncclInvalidUsage, results[r]) << "rank " << r << ": " << messages[r];
    EXPECT_NE(std::string::npos, messages[r].find("NCCL_MOE_NET differs between ranks")) << messages[r];
    EXPECT_NE(std::string::npos, messages[r].find("rank 0 has emulated, rank 1 has auto")) << messages[r];
  }
}

TEST(ScaleoutRefusal, UnknownNetModeIsRefused) {
  const Shape s{2, 1};
  const std::string skip = skipReason(s);
  if (!skip.empty()) GTEST_SKIP() << skip;
  harness::ScopedEnv net("NCCL_MOE_NET", "emulated");
  harness::ScopedEnv emulate("NCCL_MOE_EMULATE_NODES", "2");
  harness::ScopedEnv m("NCCL_MOE_NET_MODE", "gda");
  CUDA_OK(cudaSetDevice(0));
  std::vector<ncclMoeComm_t> comms(2, nullptr);
  const std::vector<int> devices(2, 0);
  ncclMoeConfig_t c = smallConfig();
  EXPECT_EQ(ncclInvalidArgument, ncclMoeCommInitAll(comms.data(), 2, devices.data(), &c));
  const std::string msg = ncclMoeGetLastError(nullptr);
  EXPECT_NE(std::string::npos, msg.find("NCCL_MOE_NET_MODE=\"gda\"")) << msg;
  EXPECT_NE(std::string::npos, msg.find("expected ibgda, dbproxy or proxy")) << msg;
  for (ncclMoeComm_t comm : comms) EXPECT_EQ(nullptr, comm);
}

}  // namespace
