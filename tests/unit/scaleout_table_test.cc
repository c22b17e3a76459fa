// The scale-out table of a multi-node communicator (src/transport/scaleout_table.h), the shared record steps
// (src/transport/scaleout_setup.h) and the connection records the emulated transport exchanges at init
// (src/transport/emulated/comm_transport.h), as pure functions on 2x1, 2x2, 4x1, 2x4 and 4x2 node maps: which
// peers get QPs (one per QP set), what each entry holds, each set's SL / TC in the records and in the QP
// attributes, and that every rank's records pass the same checks the verbs backend's do.
#include "transport/scaleout_table.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/node_map.h"
#include "transport/emulated/comm_transport.h"
#include "transport/rdma/conn_record.h"
#include "transport/rdma/verbs/device.h"
#include "transport/rdma/verbs/qp_attr.h"
#include "transport/rdma/verbs/rc_qp.h"
#include "transport/scaleout_setup.h"

namespace {

using nccl_moe::NodeMap;
using nccl_moe::PeerWindow;
using nccl_moe::QpsBySet;
using nccl_moe::ScaleoutPeer;
namespace ib = nccl_moe::ibgda;
namespace rdma = nccl_moe::rdma;
namespace verbs = nccl_moe::verbs;

constexpr int kHt = rdma::kQpSetHighThroughput;
constexpr int kLl = rdma::kQpSetLowLatency;

std::string lastError() { return nccl_moe::threadLastError(); }

ib::GpuQp fakeQp(int rank, int peer, int set = kHt) {
  ib::GpuQp q;
  std::memset(&q, 0, sizeof(q));
  q.rank = rank;
  q.peer = peer;
  q.qpn = static_cast<uint32_t>(0x10000 * (set + 1) + 0x100 * (rank + 1) + peer);
  q.wqe_cnt = 64;
  q.cqe_cnt = 64;
  return q;
}

PeerWindow windowOf(int peer) {
  PeerWindow w;
  w.base = 0x7f0000000000ull + (static_cast<uint64_t>(peer) << 32);
  w.bytes = 1u << 20;
  w.rkey = 0x800000u | static_cast<uint32_t>(peer + 1);
  return w;
}

struct Shape {
  int nodes, per_node;
};

TEST(ScaleoutTable, RemotePeersAreTheRanksOfOtherNodes) {
  const NodeMap m22 = nccl_moe::buildEmulatedNodeMap(4, 2);
  EXPECT_EQ((std::vector<int>{2, 3}), nccl_moe::remotePeers(m22, 0));
  EXPECT_EQ((std::vector<int>{2, 3}), nccl_moe::remotePeers(m22, 1));
  EXPECT_EQ((std::vector<int>{0, 1}), nccl_moe::remotePeers(m22, 3));
  const NodeMap m41 = nccl_moe::buildEmulatedNodeMap(4, 4);
  EXPECT_EQ((std::vector<int>{0, 1, 3}), nccl_moe::remotePeers(m41, 2));
  const NodeMap m11 = nccl_moe::buildEmulatedNodeMap(4, 1);
  EXPECT_TRUE(nccl_moe::remotePeers(m11, 0).empty());
}

// Fake QPs of both sets for rank's peers (`peers`), and the table's inputs pointing at them.
struct Inputs {
  std::vector<ib::GpuQp> qps[rdma::kNumQpSets];
  QpsBySet<ib::GpuQp> qp_of_peer;
  std::vector<PeerWindow> windows;
  Inputs(int num_ranks, int rank, const std::vector<int>& peers) : windows(num_ranks) {
    for (int set = 0; set < rdma::kNumQpSets; ++set) {
      qps[set].resize(num_ranks);
      qp_of_peer[set].assign(num_ranks, nullptr);
      for (int p : peers) {
        qps[set][p] = fakeQp(rank, p, set);
        qp_of_peer[set][p] = &qps[set][p];
      }
    }
    for (int p : peers) windows[p] = windowOf(p);
  }
};

TEST(ScaleoutTable, EntriesAreValidExactlyForOtherNodesAndHoldBothSetsAndTheWindow) {
  for (const Shape s : {Shape{2, 1}, Shape{2, 2}, Shape{4, 1}, Shape{2, 4}, Shape{4, 2}}) {
    const int R = s.nodes * s.per_node;
    const NodeMap m = nccl_moe::buildEmulatedNodeMap(R, s.nodes);
    for (int rank = 0; rank < R; ++rank) {
      const Inputs in(R, rank, nccl_moe::qpPeers(m, rank, false));
      std::vector<ScaleoutPeer> table;
      ASSERT_EQ("", nccl_moe::buildScaleoutTable(m, rank, in.qp_of_peer, in.windows, &table));
      ASSERT_EQ(static_cast<size_t>(R), table.size());
      for (int p = 0; p < R; ++p) {
        const bool remote = m.node_of[p] != m.node_of[rank];
        EXPECT_EQ(remote ? 1u : 0u, table[p].valid)
            << s.nodes << "x" << s.per_node << " rank " << rank << " peer " << p;
        if (!remote) {
          EXPECT_EQ(0u, table[p].rkey);
          EXPECT_EQ(0u, table[p].remote_base);
          for (int set = 0; set < rdma::kNumQpSets; ++set) EXPECT_EQ(0u, table[p].qp[set].qpn);
          continue;
        }
        for (int set = 0; set < rdma::kNumQpSets; ++set) {
          EXPECT_EQ(in.qps[set][p].qpn, table[p].qp[set].qpn) << "set " << set;
          EXPECT_EQ(p, table[p].qp[set].peer);
          EXPECT_EQ(rank, table[p].qp[set].rank);
        }
        EXPECT_NE(table[p].qp[kHt].qpn, table[p].qp[kLl].qpn);
        EXPECT_EQ(0u, table[p].via_proxy);
        EXPECT_EQ(windowOf(p).base, table[p].remote_base);
        EXPECT_EQ(windowOf(p).bytes, table[p].window_bytes);
        EXPECT_EQ(windowOf(p).rkey, table[p].rkey);
      }
    }
  }
}

TEST(ScaleoutTable, InconsistentInputsAreRejectedNamingPeerAndSet) {
  const NodeMap m = nccl_moe::buildEmulatedNodeMap(4, 2);
  Inputs in(4, 0, {2, 3});
  std::vector<ScaleoutPeer> table;
  ASSERT_EQ("", nccl_moe::buildScaleoutTable(m, 0, in.qp_of_peer, in.windows, &table));

  auto missing = in.qp_of_peer;
  missing[kLl][3] = nullptr;
  EXPECT_EQ("peer 3 is on another node but has no low-latency QP",
            nccl_moe::buildScaleoutTable(m, 0, missing, in.windows, &table));
  auto local = in.qp_of_peer;
  local[kHt][1] = &in.qps[kHt][2];
  EXPECT_EQ("peer 1 is on this rank's node but has a high-throughput QP",
            nccl_moe::buildScaleoutTable(m, 0, local, in.windows, &table));
  auto swapped = in.qp_of_peer;
  std::swap(swapped[kLl][2], swapped[kLl][3]);
  EXPECT_EQ("peer 2's low-latency QP connects rank 0 to rank 3",
            nccl_moe::buildScaleoutTable(m, 0, swapped, in.windows, &table));
  auto shared = in.qp_of_peer;
  shared[kLl][2] = shared[kHt][2];
  EXPECT_NE(std::string::npos, nccl_moe::buildScaleoutTable(m, 0, shared, in.windows, &table)
                                   .find("peer 2's low-latency QP is the high-throughput QP too"));
  auto no_key = in.windows;
  no_key[2].rkey = 0;
  EXPECT_NE(std::string::npos, nccl_moe::buildScaleoutTable(m, 0, in.qp_of_peer, no_key, &table).find("no rkey"));
  auto short_set = in.qp_of_peer;
  short_set[kLl].resize(3);
  EXPECT_NE(std::string::npos,
            nccl_moe::buildScaleoutTable(m, 0, short_set, in.windows, &table).find("expected 4 QP and window entries"));
}

// The proxy mode's table: the same entries with each set's request-proxy view (via_proxy 1), the same checks.
TEST(ScaleoutTable, ProxyEntriesCarryEachSetsViewAndTheWindow) {
  const NodeMap m = nccl_moe::buildEmulatedNodeMap(4, 2);
  std::vector<nccl_moe::proxy::GpuProxyQp> views[rdma::kNumQpSets];
  QpsBySet<nccl_moe::proxy::GpuProxyQp> proxy_of_peer;
  std::vector<PeerWindow> windows(4);
  for (int set = 0; set < rdma::kNumQpSets; ++set) {
    views[set].resize(4);
    proxy_of_peer[set].assign(4, nullptr);
    for (int p : {0, 1}) {
      views[set][p] = nccl_moe::proxy::GpuProxyQp{};
      views[set][p].rank = 3;
      views[set][p].peer = p;
      views[set][p].qp = static_cast<uint16_t>(p);  // its index in the set's own ring
      views[set][p].qpn = 0x500u + 0x10u * static_cast<uint32_t>(set) + static_cast<uint32_t>(p);
      proxy_of_peer[set][p] = &views[set][p];
      windows[p] = windowOf(p);
    }
  }
  std::vector<ScaleoutPeer> table;
  ASSERT_EQ("", nccl_moe::buildProxyScaleoutTable(m, 3, proxy_of_peer, windows, &table));
  ASSERT_EQ(4u, table.size());
  for (int p = 0; p < 4; ++p) {
    const bool remote = p < 2;
    EXPECT_EQ(remote ? 1u : 0u, table[p].valid) << p;
    EXPECT_EQ(remote ? 1u : 0u, table[p].via_proxy) << p;
    if (!remote) continue;
    for (int set = 0; set < rdma::kNumQpSets; ++set)
      EXPECT_EQ(0x500u + 0x10u * static_cast<uint32_t>(set) + static_cast<uint32_t>(p), table[p].proxy[set].qpn);
    EXPECT_EQ(windowOf(p).rkey, table[p].rkey);
    EXPECT_EQ(windowOf(p).base, table[p].remote_base);
  }
  auto swapped = proxy_of_peer;
  std::swap(swapped[kHt][0], swapped[kHt][1]);
  EXPECT_NE(std::string::npos, nccl_moe::buildProxyScaleoutTable(m, 3, swapped, windows, &table).find("connects"));
  auto missing = proxy_of_peer;
  missing[kLl][1] = nullptr;
  EXPECT_NE(std::string::npos, nccl_moe::buildProxyScaleoutTable(m, 3, missing, windows, &table)
                                   .find("peer 1 is on another node but has "
                                         "no low-latency QP"));
}

// Pure RDMA (NCCL_MOE_NET_PURE_RDMA): the other ranks of the node get QPs and valid entries too; self never does.
TEST(ScaleoutTable, PureRdmaGivesSameNodePeersEntries) {
  const NodeMap m = nccl_moe::buildEmulatedNodeMap(4, 2);
  EXPECT_EQ((std::vector<int>{1, 2, 3}), nccl_moe::qpPeers(m, 0, true));
  EXPECT_EQ((std::vector<int>{2, 3}), nccl_moe::qpPeers(m, 0, false));
  Inputs in(4, 0, nccl_moe::qpPeers(m, 0, true));
  std::vector<ScaleoutPeer> table;
  EXPECT_NE(std::string::npos, nccl_moe::buildScaleoutTable(m, 0, in.qp_of_peer, in.windows, &table)
                                   .find("on this rank's node but has a high-throughput QP"));
  ASSERT_EQ("", nccl_moe::buildScaleoutTable(m, 0, in.qp_of_peer, in.windows, &table, true));
  EXPECT_EQ(0u, table[0].valid);
  for (int p : {1, 2, 3}) EXPECT_EQ(1u, table[p].valid) << p;
  auto self = in.qp_of_peer;
  self[kHt][0] = &in.qps[kHt][1];
  EXPECT_NE(std::string::npos, nccl_moe::buildScaleoutTable(m, 0, self, in.windows, &table, true).find("peer 0"));
}

verbs::ServiceLevels levelsFrom(const std::vector<std::pair<std::string, std::string>>& env) {
  verbs::ServiceLevels levels;
  const auto lookup = [&](const char* name) -> const char* {
    for (const auto& kv : env)
      if (kv.first == name) return kv.second.c_str();
    return nullptr;
  };
  EXPECT_EQ(ncclSuccess, verbs::resolveServiceLevels(lookup, &levels)) << lastError();
  return levels;
}

// rank -> the packed record it sends each peer, as the emulated transport publishes them.
std::vector<std::vector<std::vector<uint8_t>>> packWorld(const NodeMap& m,
                                                         const std::vector<verbs::ServiceLevels>& levels_of) {
  const int R = static_cast<int>(m.node_of.size());
  std::vector<std::vector<std::vector<uint8_t>>> packed(R, std::vector<std::vector<uint8_t>>(R));
  for (int from = 0; from < R; ++from) {
    rdma::ConnWindow w;
    w.addr = windowOf(from).base;
    w.bytes = windowOf(from).bytes;
    w.rkey = windowOf(from).rkey;
    for (int to = 0; to < R; ++to) {
      nccl_moe::QpnsBySet qpns{};
      if (m.node_of[from] != m.node_of[to])
        for (int set = 0; set < rdma::kNumQpSets; ++set) qpns[set] = fakeQp(from, to, set).qpn;
      packed[from][to].resize(rdma::kConnRecordBytes);
      const rdma::ConnRecord rec = nccl_moe::emulated::emulatedConnRecord(from, to, m, qpns, w, levels_of[from]);
      EXPECT_EQ(ncclSuccess, rdma::packConnRecord(rec, packed[from][to].data())) << lastError();
    }
  }
  return packed;
}

// What rank `me` receives in the exchange: every rank's records laid out as init's all-gather has them (no header).
std::vector<uint8_t> gathered(const std::vector<std::vector<std::vector<uint8_t>>>& packed) {
  const size_t R = packed.size();
  std::vector<uint8_t> all;
  for (size_t from = 0; from < R; ++from)
    for (size_t to = 0; to < R; ++to) all.insert(all.end(), packed[from][to].begin(), packed[from][to].end());
  return all;
}

// Every rank's records to every peer, packed and unpacked as init does, pass checkConnRecords on every rank and
// carry the QPN of the pair in each set (0 where the pair has no QP) and each set's SL / TC.
TEST(ScaleoutTable, EmulatedConnectionRecordsRoundTripAndAgree) {
  const verbs::ServiceLevels levels =
      levelsFrom({{"NCCL_MOE_IB_SL", "3"}, {"NCCL_MOE_IB_TC", "96"}, {"NCCL_MOE_IB_LL_SL", "5"}});
  for (const Shape s : {Shape{2, 1}, Shape{2, 2}, Shape{4, 1}, Shape{2, 4}}) {
    const int R = s.nodes * s.per_node;
    const NodeMap m = nccl_moe::buildEmulatedNodeMap(R, s.nodes);
    const auto packed = packWorld(m, std::vector<verbs::ServiceLevels>(R, levels));
    const std::vector<uint8_t> all = gathered(packed);
    for (int me = 0; me < R; ++me) {
      std::vector<rdma::ConnRecord> got;
      std::vector<PeerWindow> windows;
      const std::vector<int> peers = nccl_moe::qpPeers(m, me, false);
      ASSERT_EQ(ncclSuccess, nccl_moe::readPeerRecords(all.data(), R * rdma::kConnRecordBytes, 0, m, me, peers,
                                                       "rank " + std::to_string(me), &got, &windows))
          << lastError();
      for (int from = 0; from < R; ++from) {
        const bool remote = m.node_of[from] != m.node_of[me];
        for (int set = 0; set < rdma::kNumQpSets; ++set) {
          EXPECT_EQ(1, got[from].num_qps[set]);
          EXPECT_EQ(remote ? fakeQp(from, me, set).qpn : 0u, got[from].qpn[set][0]);
        }
        EXPECT_EQ(3, got[from].sl[kHt]);
        EXPECT_EQ(5, got[from].sl[kLl]);
        EXPECT_EQ(96, got[from].traffic_class[kHt]);
        EXPECT_EQ(96, got[from].traffic_class[kLl]) << "the LL TC defaults to the general one";
        EXPECT_EQ(m.node_of[from], got[from].node);
        EXPECT_EQ(1, got[from].num_windows);
        EXPECT_EQ(windowOf(from).rkey, got[from].windows[0].rkey);
        EXPECT_EQ(std::string("emulated-") + std::to_string(from), got[from].nic_name);
      }
      for (int p : peers) {
        EXPECT_EQ(windowOf(p).base, windows[p].base);
        EXPECT_EQ(windowOf(p).rkey, windows[p].rkey);
      }
    }
  }
}

// One rank read a different NCCL_MOE_IB_LL_SL: every rank's check of the records it received names the set, rank
// 0's value and the differing rank's, the same message on every rank.
TEST(ScaleoutTable, ASetsServiceLevelThatDiffersIsReportedOnEveryRank) {
  const NodeMap m = nccl_moe::buildEmulatedNodeMap(4, 2);
  std::vector<verbs::ServiceLevels> levels(4, levelsFrom({{"NCCL_MOE_IB_LL_SL", "4"}}));
  levels[2] = levelsFrom({{"NCCL_MOE_IB_LL_SL", "6"}});
  const std::vector<uint8_t> all = gathered(packWorld(m, levels));
  std::string first;
  for (int me = 0; me < 4; ++me) {
    std::vector<rdma::ConnRecord> got;
    std::vector<PeerWindow> windows;
    EXPECT_EQ(ncclInvalidUsage, nccl_moe::readPeerRecords(
                                    all.data(), 4 * rdma::kConnRecordBytes, 0, m, me, nccl_moe::qpPeers(m, me, false),
                                    "emulated transport of rank " + std::to_string(me), &got, &windows));
    const std::string msg = lastError();
    EXPECT_NE(std::string::npos, msg.find("emulated transport of rank " + std::to_string(me))) << msg;
    const size_t at = msg.find(
        "connection records disagree: service level of the low-latency set: rank 0 has 4, "
        "rank 2 has 6");
    EXPECT_NE(std::string::npos, at) << msg;
    if (me == 0) first = msg.substr(at);
    EXPECT_EQ(first, msg.substr(at == std::string::npos ? 0 : at)) << "rank " << me;
  }
  // A traffic class of the general set, too.
  levels.assign(4, levelsFrom({}));
  levels[3] = levelsFrom({{"NCCL_MOE_IB_TC", "0x20"}});
  const std::vector<uint8_t> tc = gathered(packWorld(m, levels));
  std::vector<rdma::ConnRecord> got;
  std::vector<PeerWindow> windows;
  EXPECT_EQ(ncclInvalidUsage,
            nccl_moe::readPeerRecords(tc.data(), 4 * rdma::kConnRecordBytes, 0, m, 1, {2, 3}, "r1", &got, &windows));
  EXPECT_NE(std::string::npos,
            lastError().find("traffic class of the high-throughput set: rank 0 has 0, rank 3 has 32"))
      << lastError();
}

// A record without a QP in one set for a remote pair, or on another node than the map says, is refused by name.
TEST(ScaleoutTable, ARecordMissingASetsQpIsRefused) {
  const NodeMap m = nccl_moe::buildEmulatedNodeMap(2, 2);
  auto packed = packWorld(m, std::vector<verbs::ServiceLevels>(2, levelsFrom({})));
  rdma::ConnRecord rec;
  ASSERT_EQ(ncclSuccess, rdma::unpackConnRecord(packed[1][0].data(), rdma::kConnRecordBytes, &rec));
  rec.qpn[kLl][0] = 0;
  ASSERT_EQ(ncclSuccess, rdma::packConnRecord(rec, packed[1][0].data()));
  std::vector<rdma::ConnRecord> got;
  std::vector<PeerWindow> windows;
  const std::vector<uint8_t> all = gathered(packed);
  EXPECT_EQ(ncclInvalidUsage,
            nccl_moe::readPeerRecords(all.data(), 2 * rdma::kConnRecordBytes, 0, m, 0, {1}, "t", &got, &windows));
  EXPECT_EQ("t: rank 1's record lists no low-latency QP for rank 0; expected one", lastError());
}

// Each set's SL / TC reach the attributes of its QPs: the connect config built for the set from the peer's record
// (its QPN of that set) carries the set's service level, and the RTR transition puts it into ah_attr.
TEST(ScaleoutTable, EachSetsServiceLevelReachesItsQpAttributes) {
  const verbs::ServiceLevels levels = levelsFrom(
      {{"NCCL_IB_SL", "1"}, {"NCCL_MOE_IB_TC", "0x40"}, {"NCCL_MOE_IB_LL_SL", "7"}, {"NCCL_MOE_IB_LL_TC", "0xb8"}});
  const NodeMap m = nccl_moe::buildEmulatedNodeMap(2, 2);
  const auto packed = packWorld(m, std::vector<verbs::ServiceLevels>(2, levels));
  rdma::ConnRecord remote;
  ASSERT_EQ(ncclSuccess, rdma::unpackConnRecord(packed[1][0].data(), rdma::kConnRecordBytes, &remote));
  remote.link_layer = 1;  // RoCE: a GRH, so the TC is in the attributes too
  remote.active_mtu = IBV_MTU_4096;
  remote.gid[15] = 1;
  verbs::PortIdentity local;
  local.name = "mlx5_0";
  local.port = 1;
  local.link_layer = verbs::LinkLayer::kEthernet;
  const struct {
    int set;
    uint8_t sl, tc;
    const char* sl_source;
  } want[] = {{kHt, 1, 0x40, "NCCL_IB_SL"}, {kLl, 7, 0xb8, "NCCL_MOE_IB_LL_SL"}};
  for (const auto& w : want) {
    const verbs::ServiceLevel& level = nccl_moe::serviceLevelOf(levels, w.set);
    EXPECT_STREQ(w.sl_source, level.sl_source);
    verbs::QpConnectConfig config;
    ASSERT_EQ(ncclSuccess, verbs::buildConnectConfig(local, 0x10, remote, w.set, 0, level, &config)) << lastError();
    EXPECT_EQ(fakeQp(1, 0, w.set).qpn, config.remote_qpn) << "the peer's QP of the same set";
    verbs::QpTransition rtr;
    ASSERT_EQ(ncclSuccess, verbs::buildQpTransition(config, IBV_QPS_INIT, IBV_QPS_RTR, &rtr)) << lastError();
    EXPECT_EQ(w.sl, rtr.attr.ah_attr.sl) << rdma::qpSetName(w.set);
    EXPECT_EQ(w.tc, rtr.attr.ah_attr.grh.traffic_class) << rdma::qpSetName(w.set);
  }
  EXPECT_EQ(
      "high-throughput set SL 1 (NCCL_IB_SL), TC 64 (NCCL_MOE_IB_TC); low-latency set SL 7 (NCCL_MOE_IB_LL_SL), TC "
      "184 (NCCL_MOE_IB_LL_TC)",
      nccl_moe::describeQpSets(levels));
}

}  // namespace
