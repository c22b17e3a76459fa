// The scale-out table of a multi-node communicator (src/transport/scaleout_table.h) and the connection records
// the emulated transport exchanges at init (src/transport/emulated/comm_transport.h), as pure functions on 2x1,
// 2x2 and 4x1 node maps: which peers get a QP, what each entry holds, and that every rank's records pass the
// same checks the verbs backend's will.
#include "transport/scaleout_table.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "core/node_map.h"
#include "transport/emulated/comm_transport.h"
#include "transport/rdma/conn_record.h"

namespace {

using nccl_moe::NodeMap;
using nccl_moe::PeerWindow;
using nccl_moe::ScaleoutPeer;
namespace ib = nccl_moe::ibgda;
namespace rdma = nccl_moe::rdma;

ib::GpuQp fakeQp(int rank, int peer) {
  ib::GpuQp q;
  std::memset(&q, 0, sizeof(q));
  q.rank = rank;
  q.peer = peer;
  q.qpn = static_cast<uint32_t>(0x100 * (rank + 1) + peer);
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

TEST(ScaleoutTable, EntriesAreValidExactlyForOtherNodesAndHoldQpAndWindow) {
  for (const Shape s : {Shape{2, 1}, Shape{2, 2}, Shape{4, 1}, Shape{2, 4}, Shape{4, 2}}) {
    const int R = s.nodes * s.per_node;
    const NodeMap m = nccl_moe::buildEmulatedNodeMap(R, s.nodes);
    for (int rank = 0; rank < R; ++rank) {
      std::vector<ib::GpuQp> qps(R);
      std::vector<const ib::GpuQp*> qp_of_peer(R, nullptr);
      std::vector<PeerWindow> windows(R);
      for (int p : nccl_moe::remotePeers(m, rank)) {
        qps[p] = fakeQp(rank, p);
        qp_of_peer[p] = &qps[p];
        windows[p] = windowOf(p);
      }
      std::vector<ScaleoutPeer> table;
      ASSERT_EQ("", nccl_moe::buildScaleoutTable(m, rank, qp_of_peer, windows, &table));
      ASSERT_EQ(static_cast<size_t>(R), table.size());
      for (int p = 0; p < R; ++p) {
        const bool remote = m.node_of[p] != m.node_of[rank];
        EXPECT_EQ(remote ? 1u : 0u, table[p].valid)
            << s.nodes << "x" << s.per_node << " rank " << rank << " peer " << p;
        if (!remote) {
          EXPECT_EQ(0u, table[p].rkey);
          EXPECT_EQ(0u, table[p].remote_base);
          continue;
        }
        EXPECT_EQ(qps[p].qpn, table[p].qp.qpn);
        EXPECT_EQ(p, table[p].qp.peer);
        EXPECT_EQ(rank, table[p].qp.rank);
        EXPECT_EQ(windowOf(p).base, table[p].remote_base);
        EXPECT_EQ(windowOf(p).bytes, table[p].window_bytes);
        EXPECT_EQ(windowOf(p).rkey, table[p].rkey);
      }
    }
  }
}

TEST(ScaleoutTable, InconsistentInputsAreRejected) {
  const NodeMap m = nccl_moe::buildEmulatedNodeMap(4, 2);
  std::vector<ib::GpuQp> qps(4);
  std::vector<const ib::GpuQp*> qp_of_peer(4, nullptr);
  std::vector<PeerWindow> windows(4);
  for (int p : {2, 3}) {
    qps[p] = fakeQp(0, p);
    qp_of_peer[p] = &qps[p];
    windows[p] = windowOf(p);
  }
  std::vector<ScaleoutPeer> table;
  ASSERT_EQ("", nccl_moe::buildScaleoutTable(m, 0, qp_of_peer, windows, &table));

  auto missing = qp_of_peer;
  missing[3] = nullptr;
  EXPECT_NE(std::string::npos, nccl_moe::buildScaleoutTable(m, 0, missing, windows, &table).find("peer 3"));
  auto local = qp_of_peer;
  local[1] = &qps[2];
  EXPECT_NE(std::string::npos,
            nccl_moe::buildScaleoutTable(m, 0, local, windows, &table).find("on this rank's node but has a QP"));
  auto swapped = qp_of_peer;
  std::swap(swapped[2], swapped[3]);
  EXPECT_NE(std::string::npos, nccl_moe::buildScaleoutTable(m, 0, swapped, windows, &table).find("connects"));
  auto no_key = windows;
  no_key[2].rkey = 0;
  EXPECT_NE(std::string::npos, nccl_moe::buildScaleoutTable(m, 0, qp_of_peer, no_key, &table).find("no rkey"));
  EXPECT_NE(std::string::npos,
            nccl_moe::buildScaleoutTable(m, 0, std::vector<const ib::GpuQp*>(3), windows, &table).find("expected 4"));
}

// The proxy mode's table: the same entries with the request-proxy view (via_proxy 1), the same checks.
TEST(ScaleoutTable, ProxyEntriesCarryTheViewAndTheWindow) {
  const NodeMap m = nccl_moe::buildEmulatedNodeMap(4, 2);
  std::vector<nccl_moe::proxy::GpuProxyQp> views(4);
  std::vector<const nccl_moe::proxy::GpuProxyQp*> proxy_of_peer(4, nullptr);
  std::vector<PeerWindow> windows(4);
  for (int p : {0, 1}) {
    views[p] = nccl_moe::proxy::GpuProxyQp{};
    views[p].rank = 3;
    views[p].peer = p;
    views[p].qp = static_cast<uint16_t>(p);
    views[p].qpn = 0x500u + static_cast<uint32_t>(p);
    proxy_of_peer[p] = &views[p];
    windows[p] = windowOf(p);
  }
  std::vector<ScaleoutPeer> table;
  ASSERT_EQ("", nccl_moe::buildProxyScaleoutTable(m, 3, proxy_of_peer, windows, &table));
  ASSERT_EQ(4u, table.size());
  for (int p = 0; p < 4; ++p) {
    const bool remote = p < 2;
    EXPECT_EQ(remote ? 1u : 0u, table[p].valid) << p;
    EXPECT_EQ(remote ? 1u : 0u, table[p].via_proxy) << p;
    if (!remote) continue;
    EXPECT_EQ(0x500u + static_cast<uint32_t>(p), table[p].proxy.qpn);
    EXPECT_EQ(windowOf(p).rkey, table[p].rkey);
    EXPECT_EQ(windowOf(p).base, table[p].remote_base);
  }
  auto swapped = proxy_of_peer;
  std::swap(swapped[0], swapped[1]);
  EXPECT_NE(std::string::npos, nccl_moe::buildProxyScaleoutTable(m, 3, swapped, windows, &table).find("connects"));
  auto missing = proxy_of_peer;
  missing[1] = nullptr;
  EXPECT_NE(std::string::npos, nccl_moe::buildProxyScaleoutTable(m, 3, missing, windows, &table).find("peer 1"));
}

// Pure RDMA (NCCL_MOE_NET_PURE_RDMA): the other ranks of the node get QPs and valid entries too; self never does.
TEST(ScaleoutTable, PureRdmaGivesSameNodePeersEntries) {
  const NodeMap m = nccl_moe::buildEmulatedNodeMap(4, 2);
  std::vector<ib::GpuQp> qps(4);
  std::vector<const ib::GpuQp*> qp_of_peer(4, nullptr);
  std::vector<PeerWindow> windows(4);
  for (int p : {1, 2, 3}) {
    qps[p] = fakeQp(0, p);
    qp_of_peer[p] = &qps[p];
    windows[p] = windowOf(p);
  }
  std::vector<ScaleoutPeer> table;
  EXPECT_NE(std::string::npos,
            nccl_moe::buildScaleoutTable(m, 0, qp_of_peer, windows, &table).find("on this rank's node but has a QP"));
  ASSERT_EQ("", nccl_moe::buildScaleoutTable(m, 0, qp_of_peer, windows, &table, true));
  EXPECT_EQ(0u, table[0].valid);
  for (int p : {1, 2, 3}) EXPECT_EQ(1u, table[p].valid) << p;
  auto self = qp_of_peer;
  self[0] = &qps[1];
  EXPECT_NE(std::string::npos, nccl_moe::buildScaleoutTable(m, 0, self, windows, &table, true).find("peer 0"));
}

// Every rank's records to every peer, packed and unpacked as init does, pass checkConnRecords on every rank and
// carry the QPN of the pair (0 where the pair has no QP).
TEST(ScaleoutTable, EmulatedConnectionRecordsRoundTripAndAgree) {
  for (const Shape s : {Shape{2, 1}, Shape{2, 2}, Shape{4, 1}}) {
    const int R = s.nodes * s.per_node;
    const NodeMap m = nccl_moe::buildEmulatedNodeMap(R, s.nodes);
    auto qpn = [&](int from, int to) -> uint32_t {
      return m.node_of[from] != m.node_of[to] ? static_cast<uint32_t>(0x1000 * (from + 1) + to) : 0u;
    };
    // packed[from][to]
    std::vector<std::vector<std::vector<uint8_t>>> packed(R, std::vector<std::vector<uint8_t>>(R));
    for (int from = 0; from < R; ++from) {
      rdma::ConnWindow w;
      w.addr = windowOf(from).base;
      w.bytes = windowOf(from).bytes;
      w.rkey = windowOf(from).rkey;
      for (int to = 0; to < R; ++to) {
        packed[from][to].resize(rdma::kConnRecordBytes);
        const rdma::ConnRecord rec =
            nccl_moe::emulated::emulatedConnRecord(from, to, R, m.node_of[from], qpn(from, to), w);
        ASSERT_EQ(ncclSuccess, rdma::packConnRecord(rec, packed[from][to].data()));
      }
    }
    for (int me = 0; me < R; ++me) {
      std::vector<rdma::ConnRecord> got(R);
      for (int from = 0; from < R; ++from)
        ASSERT_EQ(ncclSuccess, rdma::unpackConnRecord(packed[from][me].data(), rdma::kConnRecordBytes, &got[from]));
      ASSERT_EQ(ncclSuccess, rdma::checkConnRecords(got.data(), R, me));
      for (int from = 0; from < R; ++from) {
        EXPECT_EQ(qpn(from, me), got[from].qpn[rdma::kQpSetHighThroughput][0]);
        EXPECT_EQ(m.node_of[from], got[from].node);
        EXPECT_EQ(1, got[from].num_windows);
        EXPECT_EQ(windowOf(from).rkey, got[from].windows[0].rkey);
        EXPECT_EQ(std::string("emulated-") + std::to_string(from), got[from].nic_name);
      }
    }
  }
}

}  // namespace
