#include "transport/scaleout_table.h"

#include <cstring>

namespace nccl_moe {

std::vector<int> remotePeers(const NodeMap& nodes, int rank) {
  std::vector<int> peers;
  for (size_t p = 0; p < nodes.node_of.size(); ++p)
    if (nodes.node_of[p] != nodes.node_of[rank]) peers.push_back(static_cast<int>(p));
  return peers;
}

namespace {

// Entry p from its QP (`set` fills the mode's fields; `qp_rank` / `qp_peer` are what the QP connects).
template <typename Qp, typename Set>
std::string buildTable(const NodeMap& nodes, int rank, const std::vector<const Qp*>& qp_of_peer,
                       const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                       bool same_node_qps, Set set) {
  const size_t num_ranks = nodes.node_of.size();
  if (rank < 0 || static_cast<size_t>(rank) >= num_ranks) return "rank " + std::to_string(rank) + " out of range";
  if (qp_of_peer.size() != num_ranks || window_of_peer.size() != num_ranks)
    return "expected " + std::to_string(num_ranks) + " QP and window entries, got " +
           std::to_string(qp_of_peer.size()) + " and " + std::to_string(window_of_peer.size());
  std::vector<ScaleoutPeer> table(num_ranks);
  for (size_t p = 0; p < num_ranks; ++p) {
    ScaleoutPeer& e = table[p];
    std::memset(&e, 0, sizeof(e));
    const std::string who = "peer " + std::to_string(p);
    const bool remote = nodes.node_of[p] != nodes.node_of[rank] || (same_node_qps && p != static_cast<size_t>(rank));
    if (!remote) {
      if (qp_of_peer[p] != nullptr) return who + " is on this rank's node but has a QP";
      continue;
    }
    const Qp* qp = qp_of_peer[p];
    if (qp == nullptr) return who + " is on another node but has no QP";
    if (qp->peer != static_cast<int>(p) || qp->rank != rank)
      return who + "'s QP connects rank " + std::to_string(qp->rank) + " to rank " + std::to_string(qp->peer);
    const PeerWindow& w = window_of_peer[p];
    if (w.rkey == 0 || w.bytes == 0) return who + "'s window has no rkey or no bytes";
    set(*qp, &e);
    e.remote_base = w.base;
    e.window_bytes = w.bytes;
    e.rkey = w.rkey;
    e.valid = 1;
  }
  *out = std::move(table);
  return "";
}

}  // namespace

std::string buildScaleoutTable(const NodeMap& nodes, int rank, const std::vector<const ibgda::GpuQp*>& qp_of_peer,
                               const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                               bool same_node_qps) {
  return buildTable(nodes, rank, qp_of_peer, window_of_peer, out, same_node_qps,
                    [](const ibgda::GpuQp& qp, ScaleoutPeer* e) {
                      e->qp = qp;
                      e->via_proxy = 0;
                    });
}

std::string buildProxyScaleoutTable(const NodeMap& nodes, int rank,
                                    const std::vector<const proxy::GpuProxyQp*>& proxy_of_peer,
                                    const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                                    bool same_node_qps) {
  return buildTable(nodes, rank, proxy_of_peer, window_of_peer, out, same_node_qps,
                    [](const proxy::GpuProxyQp& q, ScaleoutPeer* e) {
                      e->proxy = q;
                      e->via_proxy = 1;
                    });
}

}  // namespace nccl_moe
