#include "transport/scaleout_table.h"

#include <cstdio>
#include <cstring>

namespace nccl_moe {

std::vector<int> remotePeers(const NodeMap& nodes, int rank) {
  std::vector<int> peers;
  for (size_t p = 0; p < nodes.node_of.size(); ++p)
    if (nodes.node_of[p] != nodes.node_of[rank]) peers.push_back(static_cast<int>(p));
  return peers;
}

namespace {

std::string hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%x", v);
  return buf;
}

// Entry p from its QPs (`fill` copies set s's QP into the mode's fields; `rank` / `peer` are what a QP connects).
template <typename Qp, typename Fill>
std::string buildTable(const NodeMap& nodes, int rank, const QpsBySet<Qp>& qp_of_peer,
                       const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                       bool same_node_qps, Fill fill) {
  const size_t num_ranks = nodes.node_of.size();
  if (rank < 0 || static_cast<size_t>(rank) >= num_ranks) return "rank " + std::to_string(rank) + " out of range";
  for (int s = 0; s < rdma::kNumQpSets; ++s)
    if (qp_of_peer[s].size() != num_ranks || window_of_peer.size() != num_ranks)
      return "expected " + std::to_string(num_ranks) + " QP and window entries, got " +
             std::to_string(qp_of_peer[s].size()) + " (" + rdma::qpSetName(s) + " set) and " +
             std::to_string(window_of_peer.size());
  std::vector<ScaleoutPeer> table(num_ranks);
  for (size_t p = 0; p < num_ranks; ++p) {
    ScaleoutPeer& e = table[p];
    std::memset(&e, 0, sizeof(e));
    const std::string who = "peer " + std::to_string(p);
    const bool remote = nodes.node_of[p] != nodes.node_of[rank] || (same_node_qps && p != static_cast<size_t>(rank));
    for (int s = 0; s < rdma::kNumQpSets; ++s) {
      const std::string which = who + "'s " + rdma::qpSetName(s) + " QP";
      const Qp* qp = qp_of_peer[s][p];
      if (!remote) {
        if (qp != nullptr) return who + " is on this rank's node but has a " + rdma::qpSetName(s) + " QP";
        continue;
      }
      if (qp == nullptr) return who + " is on another node but has no " + rdma::qpSetName(s) + " QP";
      if (qp->peer != static_cast<int>(p) || qp->rank != rank)
        return which + " connects rank " + std::to_string(qp->rank) + " to rank " + std::to_string(qp->peer);
      for (int t = 0; t < s; ++t)
        if (qp_of_peer[t][p] == qp || qp_of_peer[t][p]->qpn == qp->qpn)
          return which + " is the " + rdma::qpSetName(t) + " QP too (QPN 0x" + hex(qp->qpn) +
                 "): each set needs its own QP";
      fill(*qp, s, &e);
    }
    if (!remote) continue;
    const PeerWindow& w = window_of_peer[p];
    if (w.rkey == 0 || w.bytes == 0) return who + "'s window has no rkey or no bytes";
    e.remote_base = w.base;
    e.window_bytes = w.bytes;
    e.rkey = w.rkey;
    e.signal_rkey = w.signal_rkey != 0 ? w.signal_rkey : w.rkey;
    e.valid = 1;
  }
  *out = std::move(table);
  return "";
}

}  // namespace

std::string buildScaleoutTable(const NodeMap& nodes, int rank, const QpsBySet<ibgda::GpuQp>& qp_of_peer,
                               const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                               bool same_node_qps) {
  return buildTable(nodes, rank, qp_of_peer, window_of_peer, out, same_node_qps,
                    [](const ibgda::GpuQp& qp, int set, ScaleoutPeer* e) {
                      e->qp[set] = qp;
                      e->via_proxy = 0;
                    });
}

std::string buildProxyScaleoutTable(const NodeMap& nodes, int rank, const QpsBySet<proxy::GpuProxyQp>& proxy_of_peer,
                                    const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                                    bool same_node_qps) {
  return buildTable(nodes, rank, proxy_of_peer, window_of_peer, out, same_node_qps,
                    [](const proxy::GpuProxyQp& q, int set, ScaleoutPeer* e) {
                      e->proxy[set] = q;
                      e->via_proxy = 1;
                    });
}

}  // namespace nccl_moe
