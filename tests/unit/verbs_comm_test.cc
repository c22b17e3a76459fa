// The verbs backend as a communicator's scale-out transport (src/transport/rdma/verbs/comm_transport.h) through
// the init step every transport shares (src/transport/scaleout_setup.h setupScaleout), in in-process worlds of
// 2 and 4 ranks (makeWorldBootstraps) whose ranks each own a fake NIC (tests/unit/fake_verbs.h): the records
// really go through the bootstrap's all-gather, every rank builds its device table, and the test reads the tables
// and the fakes' calls. Also: every failure on one rank gives every rank an error with a message (no hang), the
// SL / TC of each QP set reach its QPs' attributes and the INFO text, and on this machine the real loader's
// failure names what is missing.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/bootstrap.h"
#include "core/error.h"
#include "core/node_map.h"
#include "fake_verbs.h"
#include "transport/rdma/verbs/comm_transport.h"
#include "transport/scaleout_setup.h"

namespace nccl_moe::verbs {
namespace {

using namespace fake;  // NOLINT: the doubles and their state

constexpr int kHt = rdma::kQpSetHighThroughput;
constexpr int kLl = rdma::kQpSetLowLatency;
constexpr uint64_t kBufferBytes = 1u << 20;

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// What one rank saw, copied out before its transport (and fake) went away.
struct RankOutcome {
  ncclResult_t res = ncclInternalError;
  std::string error;
  std::string info;                 // the QP sets' INFO text
  std::vector<ScaleoutPeer> table;  // copied from the fake device memory
  std::vector<Fake::Mod> mods;
  std::vector<Fake::Reg> regs;
  std::map<uint32_t, int> qp_set_of_qpn;  // this rank's QPs: QPN -> set (from the transport)
  uint32_t data_rkey = 0, signal_rkey = 0;
  uint64_t buffer_addr = 0;
  int num_qps = 0;
  bool leaked = false;  // a fake object or registration outlived the transport
  // Doorbells: the transport chose the proxy; its describe(); UAR pages registered (IoMemory) while it lived; every
  // table QP rings a mapped mailbox (not the UAR); a word stored to the first QP's mailbox reached the (fake) UAR.
  bool doorbell_proxy = false;
  std::string describe;
  int io_regs = 0;
  bool views_ring_mailboxes = false;
  bool forwarded_to_uar = false;
};

struct World {
  int num_ranks = 2;
  int num_nodes = 2;
  bool use_fakes = true;
  std::vector<std::map<std::string, std::string>> env;  // [rank]
  std::vector<std::string> fail;                        // [rank] the call that fails ("" none)
  std::vector<bool> no_devices;                         // [rank] its fake lists no NIC
  std::vector<DoorbellPath> doorbell;                   // [rank] (default: unset, kGpuElseProxy)
};

std::vector<RankOutcome> run(World w) {
  const int R = w.num_ranks;
  w.env.resize(R);
  w.fail.resize(R);
  w.no_devices.resize(R, false);
  w.doorbell.resize(R, DoorbellPath::kGpuElseProxy);
  std::vector<std::unique_ptr<Bootstrap>> boots(R);
  EXPECT_EQ(ncclSuccess, makeWorldBootstraps(R, 20ull * 1000 * 1000 * 1000, boots.data()));
  IbvApi ibv;
  Mlx5Api dv;
  CudaOps cuda;
  installFakes(&ibv, &dv, &cuda);
  const NodeMap nodes = buildEmulatedNodeMap(R, w.num_nodes);
  std::vector<RankOutcome> out(R);
  std::vector<std::thread> threads;
  for (int r = 0; r < R; ++r) {
    threads.emplace_back([&, r] {
      Fake fk;
      g = &fk;
      setInfiniBandDefaults(&fk, static_cast<uint16_t>(0x11 + r));
      fk.next_qpn = 0x1000u * static_cast<uint32_t>(r + 1);
      fk.next_key = 0x100000u * static_cast<uint32_t>(r + 1);
      fk.fail = w.fail[r];
      if (w.no_devices[r]) fk.names.clear();
      void* buffer = std::aligned_alloc(4096, kBufferBytes);
      ErrorRecord error_record{};
      CommTransportSpec spec;
      spec.rank = r;
      spec.nodes = nodes;
      spec.buffer = static_cast<uint8_t*>(buffer);
      spec.buffer_bytes = kBufferBytes;
      spec.dev_error = &error_record;
      spec.timeout_ns = 1000000000ull;
      spec.first_psn = 0x100 + static_cast<uint32_t>(r);
      spec.doorbell = w.doorbell[r];
      if (w.use_fakes) {
        spec.ibv = &ibv;
        spec.mlx5 = &dv;
      }
      spec.device.cuda = &cuda;
      spec.device.sysfs_root = "/nonexistent";
      const std::map<std::string, std::string>& env = w.env[r];
      spec.device.env = [&env](const char* name) -> const char* {
        auto it = env.find(name);
        return it == env.end() ? nullptr : it->second.c_str();
      };
      std::unique_ptr<ScaleoutTransport> t;
      RankOutcome& o = out[r];
      const auto create = [&](uint8_t* mine, std::unique_ptr<ScaleoutTransport>* made) {
        std::unique_ptr<CommTransport> c;
        const ncclResult_t res = CommTransport::create(spec, &c, mine);
        *made = std::move(c);
        return res;
      };
      o.res = setupScaleout(*boots[r], "verbs", commTransportRecordBytes(R), create, &t, &o.info);
      o.error = o.res == ncclSuccess ? "" : threadLastError();
      if (o.res == ncclSuccess) {
        o.table.assign(t->deviceTable(), t->deviceTable() + R);  // fake device memory is host memory
        o.num_qps = t->numQps();
        const auto& v = static_cast<const CommTransport&>(*t);
        o.data_rkey = v.dataWindow().window().rkey;
        o.signal_rkey = v.signalWindow().window().rkey;
        o.buffer_addr = v.window().addr;
        for (int set = 0; set < rdma::kNumQpSets; ++set)
          for (int p = 0; p < R; ++p)
            if (v.qp(set, p) != nullptr) o.qp_set_of_qpn[v.qp(set, p)->qpn()] = set;
        o.doorbell_proxy = v.doorbellProxy();
        o.describe = v.describe();
        for (const auto& reg : fk.host_regs) o.io_regs += (reg.second.second & cudaHostRegisterIoMemory) != 0 ? 1 : 0;
        const uintptr_t uar = reinterpret_cast<uintptr_t>(fk.uar_page.p) + 0x800;
        o.views_ring_mailboxes = true;
        uint64_t* first_mailbox = nullptr;
        for (int p = 0; p < R; ++p)
          for (int set = 0; set < rdma::kNumQpSets; ++set) {
            if (o.table[p].valid == 0) continue;
            const uintptr_t host = reinterpret_cast<uintptr_t>(o.table[p].qp[set].doorbell) - kDevOffset;
            o.views_ring_mailboxes = o.views_ring_mailboxes && host != uar;
            if (first_mailbox == nullptr && host != uar) first_mailbox = reinterpret_cast<uint64_t*>(host);
          }
        if (first_mailbox != nullptr && o.doorbell_proxy) {
          const uint64_t word = 0x1234000000000000ull | static_cast<uint64_t>(r + 1);
          __atomic_store_n(first_mailbox, word, __ATOMIC_RELEASE);
          for (int i = 0; i < 20000 && !o.forwarded_to_uar; ++i) {
            o.forwarded_to_uar = __atomic_load_n(reinterpret_cast<uint64_t*>(uar), __ATOMIC_ACQUIRE) == word;
            std::this_thread::sleep_for(std::chrono::microseconds(100));
          }
        }
      }
      o.mods = fk.mods;
      o.regs = fk.regs;
      t.reset();
      o.leaked = fk.contexts != 0 || fk.pds != 0 || fk.mrs != 0 || fk.cqs != 0 || fk.qps != 0 ||
                 !fk.host_regs.empty() || !fk.device_allocs.empty();
      g = nullptr;
      std::free(buffer);
    });
  }
  for (auto& th : threads) th.join();
  return out;
}

// 2 nodes of 1 and of 2 ranks: every rank's table has, for each rank of the other node, this rank's QP of each set
// (its own QPN), the peer's buffer base, data rkey and signal rkey; each QP was connected RESET -> INIT -> RTR ->
// RTS to the peer's QP of the same set with that set's SL; the buffer was registered relaxed for data, strictly
// for signals.
TEST(VerbsComm, WorldsBuildTablesOfBothSetsFromExchangedRecords) {
  for (const int R : {2, 4}) {
    World w;
    w.num_ranks = R;
    w.env.assign(R, {{"NCCL_MOE_IB_SL", "2"}, {"NCCL_MOE_IB_LL_SL", "6"}, {"NCCL_MOE_IB_LL_TC", "0x28"}});
    const std::vector<RankOutcome> out = run(w);
    const NodeMap nodes = buildEmulatedNodeMap(R, 2);
    for (int r = 0; r < R; ++r) {
      const RankOutcome& o = out[r];
      ASSERT_EQ(ncclSuccess, o.res) << "rank " << r << ": " << o.error;
      EXPECT_FALSE(o.leaked) << "rank " << r;
      const std::vector<int> peers = remotePeers(nodes, r);
      EXPECT_EQ(static_cast<int>(2 * peers.size()), o.num_qps);
      EXPECT_EQ(
          "high-throughput set SL 2 (NCCL_MOE_IB_SL), TC 0 (default); low-latency set SL 6 (NCCL_MOE_IB_LL_SL), "
          "TC 40 (NCCL_MOE_IB_LL_TC)",
          o.info);
      for (int p = 0; p < R; ++p) {
        const ScaleoutPeer& e = o.table[p];
        const bool remote = nodes.node_of[p] != nodes.node_of[r];
        ASSERT_EQ(remote ? 1u : 0u, e.valid) << r << "->" << p;
        if (!remote) continue;
        EXPECT_EQ(out[p].buffer_addr, e.remote_base);
        EXPECT_EQ(kBufferBytes, e.window_bytes);
        EXPECT_EQ(out[p].data_rkey, e.rkey);
        EXPECT_EQ(out[p].signal_rkey, e.signal_rkey);
        EXPECT_NE(e.rkey, e.signal_rkey);
        EXPECT_EQ(0u, e.via_proxy);
        for (int set = 0; set < rdma::kNumQpSets; ++set) {
          const ibgda::GpuQp& q = e.qp[set];
          EXPECT_EQ(r, q.rank);
          EXPECT_EQ(p, q.peer);
          ASSERT_EQ(1u, o.qp_set_of_qpn.count(q.qpn)) << "rank " << r << " set " << set;
          EXPECT_EQ(set, o.qp_set_of_qpn.at(q.qpn)) << "the table's QP of this set is this rank's QP of the set";
          // Its RTR: the peer's QP toward r of the same set, the set's SL, and the peer's first PSN.
          int rtr = 0;
          for (const Fake::Mod& m : o.mods) {
            if (m.qpn != q.qpn || m.attr.qp_state != IBV_QPS_RTR) continue;
            ++rtr;
            const uint32_t remote_qpn = out[p].table[r].qp[set].qpn;
            EXPECT_EQ(remote_qpn, m.attr.dest_qp_num) << r << "->" << p << " set " << set;
            EXPECT_EQ(set == kLl ? 6 : 2, m.attr.ah_attr.sl) << r << "->" << p << " set " << set;
            EXPECT_EQ(0x11u + static_cast<unsigned>(p), m.attr.ah_attr.dlid);
            EXPECT_EQ(0x100u + static_cast<unsigned>(p), m.attr.rq_psn);
          }
          EXPECT_EQ(1, rtr) << r << "->" << p << " set " << set;
        }
      }
      // RESET -> INIT -> RTR -> RTS on every QP.
      EXPECT_EQ(3u * static_cast<size_t>(o.num_qps), o.mods.size());
      // Data window relaxed, signal window strict, state block local-write only.
      ASSERT_EQ(3u, o.regs.size());
      EXPECT_NE(0u, o.regs[0].access & IBV_ACCESS_RELAXED_ORDERING) << "data window";
      EXPECT_EQ(0u, o.regs[1].access & IBV_ACCESS_RELAXED_ORDERING) << "signal window";
      EXPECT_NE(0u, o.regs[1].access & IBV_ACCESS_REMOTE_ATOMIC);
      EXPECT_EQ(unsigned{IBV_ACCESS_LOCAL_WRITE}, o.regs[2].access) << "fetch-add results";
    }
  }
}

// A failure on one rank, at each step, fails every rank with a message; nothing hangs and nothing leaks (mode ibgda
// set: with the mode unset an unmappable UAR is the doorbell-proxy fallback instead, tested below).
TEST(VerbsComm, AFailureOnOneRankFailsEveryRankWithAMessage) {
  const struct {
    const char* what;
    int rank;
    const char* call;
    bool connect_phase;  // the failing rank fails in connect(), after the exchange
    const char* expect;  // in the failing rank's message
  } cases[] = {
      {"no PD", 1, "ibv_alloc_pd", false, "ibv_alloc_pd failed on mlx5_0"},
      {"no QP", 0, "ibv_create_qp", false, "ibv_create_qp failed on mlx5_0 port 2"},
      {"no CQ", 3, "ibv_create_cq", false, "ibv_create_cq failed"},
      {"no GPU mapping", 2, "cudaHostRegister io", false, "UAR doorbell"},
      {"no state memory", 1, "cudaMalloc", false, "cudaMalloc failed for the QPs' GPU state"},
      {"RTR refused", 0, "ibv_modify_qp RTR", true, "ibv_modify_qp failed on mlx5_0 port 2"},
      {"table upload", 3, "cudaMemcpy", true, "cudaMemcpy failed for the scale-out table"},
  };
  for (const auto& c : cases) {
    World w;
    w.num_ranks = 4;
    w.doorbell.assign(4, DoorbellPath::kGpu);  // NCCL_MOE_NET_MODE=ibgda: an unmappable UAR is an error
    w.fail.assign(4, "");
    w.fail[c.rank] = c.call;
    const std::vector<RankOutcome> out = run(w);
    for (int r = 0; r < 4; ++r) {
      SCOPED_TRACE(std::string(c.what) + ", rank " + std::to_string(r));
      EXPECT_NE(ncclSuccess, out[r].res);
      EXPECT_FALSE(out[r].leaked);
      if (r == c.rank) {
        EXPECT_TRUE(contains(out[r].error, c.expect)) << out[r].error;
        EXPECT_TRUE(contains(out[r].error, "verbs transport of rank " + std::to_string(r))) << out[r].error;
      } else if (c.connect_phase) {
        EXPECT_EQ(ncclRemoteError, out[r].res);
        EXPECT_TRUE(contains(out[r].error, "another rank failed to connect its scale-out QPs (verbs")) << out[r].error;
      } else {
        EXPECT_EQ(ncclRemoteError, out[r].res);
        EXPECT_TRUE(contains(out[r].error,
                             "rank " + std::to_string(c.rank) + " failed to set up its scale-out transport (verbs)"))
            << out[r].error;
      }
    }
  }
}

TEST(VerbsComm, ARankWithoutANicOrWithABadServiceLevelFailsEveryRank) {
  World w;
  w.num_ranks = 2;
  w.no_devices = {false, true};
  std::vector<RankOutcome> out = run(w);
  EXPECT_EQ(ncclSystemError, out[1].res);
  EXPECT_TRUE(contains(out[1].error, "no RDMA device")) << out[1].error;
  EXPECT_TRUE(contains(out[1].error, "mlx5 (ConnectX) NIC")) << out[1].error;
  EXPECT_TRUE(contains(out[1].error, "NCCL_MOE_NET=emulated")) << out[1].error;
  EXPECT_EQ(ncclRemoteError, out[0].res);
  EXPECT_TRUE(contains(out[0].error, "rank 1 failed to set up its scale-out transport (verbs)")) << out[0].error;

  w = World{};
  w.env = {{}, {{"NCCL_MOE_IB_LL_SL", "16"}}};
  out = run(w);
  EXPECT_EQ(ncclInvalidArgument, out[1].res);
  EXPECT_TRUE(contains(out[1].error, "NCCL_MOE_IB_LL_SL")) << out[1].error;
  EXPECT_EQ(ncclRemoteError, out[0].res);
  for (const RankOutcome& o : out) EXPECT_FALSE(o.leaked);
}

// Ranks that read different SLs for a set: their QPs would send on different lanes; every rank refuses, naming the
// set and both values, after the exchange.
TEST(VerbsComm, ASetsServiceLevelThatDiffersIsRefusedOnEveryRank) {
  World w;
  w.num_ranks = 4;
  w.env.assign(4, {{"NCCL_MOE_IB_LL_SL", "4"}});
  w.env[2] = {{"NCCL_MOE_IB_LL_SL", "6"}};
  const std::vector<RankOutcome> out = run(w);
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(ncclInvalidUsage, out[r].res) << r;
    EXPECT_TRUE(contains(out[r].error, "service level of the low-latency set: rank 0 has 4, rank 2 has 6"))
        << out[r].error;
    EXPECT_FALSE(out[r].leaked);
  }
}

// This machine's rdma-core (loaded for real): without an RDMA device (or without the libraries) every rank fails,
// naming what is missing and the way to test on one host.
// NCCL_MOE_NET_MODE unset: every rank rings its UAR from the GPU while every rank can map it; when one rank cannot
// (cudaHostRegister(IoMemory) refused), EVERY rank switches its views to the mailboxes and runs the doorbell proxy,
// which forwards a mailbox word to the UAR register. dbproxy asked: no UAR is mapped at all. ibgda asked: a rank
// that cannot map fails, naming the driver settings and the doorbell proxy.
TEST(VerbsComm, DoorbellsFallBackToTheProxyOnEveryRankWhenOneRankCannotMapItsUar) {
  World unset;
  unset.num_ranks = 4;
  for (const RankOutcome& o : run(unset)) {
    ASSERT_EQ(ncclSuccess, o.res) << o.error;
    EXPECT_FALSE(o.doorbell_proxy);
    EXPECT_FALSE(o.views_ring_mailboxes) << "GPU doorbells: the views ring the UAR";
    EXPECT_EQ(1, o.io_regs) << "the one UAR page of the fake";
    EXPECT_TRUE(contains(o.describe, "GPU doorbells (the UAR mapped on every rank)")) << o.describe;
    EXPECT_FALSE(o.leaked);
  }
  World one_fails = unset;
  one_fails.fail.assign(4, "");
  one_fails.fail[1] = "cudaHostRegister io";
  const std::vector<RankOutcome> out = run(one_fails);
  for (int r = 0; r < 4; ++r) {
    const RankOutcome& o = out[r];
    ASSERT_EQ(ncclSuccess, o.res) << "rank " << r << ": " << o.error;
    EXPECT_TRUE(o.doorbell_proxy) << "rank " << r << ": every rank, not only rank 1";
    EXPECT_TRUE(o.views_ring_mailboxes) << "rank " << r;
    EXPECT_TRUE(o.forwarded_to_uar) << "rank " << r << ": the proxy thread forwards a mailbox word to the UAR";
    EXPECT_TRUE(contains(o.describe, "doorbell proxy on every rank: ranks 1 could not map their UAR pages"))
        << o.describe;
    EXPECT_FALSE(o.leaked) << "rank " << r;
  }
  EXPECT_EQ(0, out[1].io_regs);

  World asked = unset;
  asked.doorbell.assign(4, DoorbellPath::kProxy);
  for (const RankOutcome& o : run(asked)) {
    ASSERT_EQ(ncclSuccess, o.res) << o.error;
    EXPECT_TRUE(o.doorbell_proxy);
    EXPECT_EQ(0, o.io_regs) << "dbproxy: the UAR is never mapped to the GPU";
    EXPECT_TRUE(o.forwarded_to_uar);
    EXPECT_TRUE(contains(o.describe, "doorbell proxy on every rank (NCCL_MOE_NET_MODE=dbproxy)")) << o.describe;
  }

  World strict = one_fails;
  strict.doorbell.assign(4, DoorbellPath::kGpu);
  const std::vector<RankOutcome> refused = run(strict);
  for (int r = 0; r < 4; ++r) EXPECT_NE(ncclSuccess, refused[r].res) << "rank " << r;
  EXPECT_TRUE(contains(refused[1].error, "IoMemory")) << refused[1].error;
  EXPECT_TRUE(contains(refused[1].error, "doorbell proxy")) << refused[1].error;
  EXPECT_TRUE(contains(refused[0].error, "rank 1")) << refused[0].error;
}

// The decision from the headers alone, and its text.
TEST(VerbsComm, TheDoorbellDecisionIsTheSameFromEveryRanksHeaders) {
  std::vector<CommTransportRecordHeader> h(3, CommTransportRecordHeader{0, 3, 0, 0});
  std::string text;
  EXPECT_FALSE(decideDoorbellProxy(h, &text));
  EXPECT_EQ("GPU doorbells (the UAR mapped on every rank)", text);
  h[2].doorbell_proxy = 1;
  h[2].uar_failed = 1;
  h[0].doorbell_proxy = 1;
  h[0].uar_failed = 1;
  EXPECT_TRUE(decideDoorbellProxy(h, &text));
  EXPECT_TRUE(contains(text, "ranks 0 2 could not map")) << text;
  h.assign(3, CommTransportRecordHeader{0, 3, 1, 0});
  EXPECT_TRUE(decideDoorbellProxy(h, &text));
  EXPECT_EQ("doorbell proxy on every rank (NCCL_MOE_NET_MODE=dbproxy)", text);
}

TEST(VerbsComm, TheRealLoaderWithoutANicNamesWhatIsMissing) {
  const IbvApi* ibv = nullptr;
  if (ibverbs(&ibv) == ncclSuccess) {
    int n = 0;
    ibv_device** list = ibv->get_device_list(&n);
    if (list != nullptr) ibv->free_device_list(list);
    if (n > 0) GTEST_SKIP() << "this machine has an RDMA device";
  }
  World w;
  w.use_fakes = false;
  const std::vector<RankOutcome> out = run(w);
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(ncclSuccess, out[r].res);
    EXPECT_TRUE(contains(out[r].error, "verbs transport of rank " + std::to_string(r))) << out[r].error;
    EXPECT_TRUE(contains(out[r].error, "no RDMA device") || contains(out[r].error, "ibv_get_device_list failed") ||
                contains(out[r].error, "could not be loaded"))
        << out[r].error;
    EXPECT_TRUE(contains(out[r].error, "rdma-core 28+")) << out[r].error;
    EXPECT_TRUE(contains(out[r].error, "NCCL_MOE_NET=emulated")) << out[r].error;
  }
}

}  // namespace
}  // namespace nccl_moe::verbs
