#include "transport/scaleout_setup.h"

#include <cstdio>

#include "core/error.h"

namespace nccl_moe {

std::vector<int> qpPeers(const NodeMap& nodes, int rank, bool pure_rdma) {
  if (!pure_rdma) return remotePeers(nodes, rank);
  std::vector<int> peers;
  for (size_t p = 0; p < nodes.node_of.size(); ++p)
    if (static_cast<int>(p) != rank) peers.push_back(static_cast<int>(p));
  return peers;
}

const verbs::ServiceLevel& serviceLevelOf(const verbs::ServiceLevels& levels, int set) {
  return set == rdma::kQpSetLowLatency ? levels.low_latency : levels.general;
}

std::string describeQpSets(const verbs::ServiceLevels& levels) {
  std::string s;
  for (int set = 0; set < rdma::kNumQpSets; ++set) {
    const verbs::ServiceLevel& l = serviceLevelOf(levels, set);
    char part[192];
    std::snprintf(part, sizeof(part), "%s%s set SL %u (%s), TC %u (%s)", set > 0 ? "; " : "", rdma::qpSetName(set),
                  unsigned{l.sl}, l.sl_source, unsigned{l.traffic_class}, l.tc_source);
    s += part;
  }
  return s;
}

rdma::ConnRecord scaleoutConnRecord(int rank, int peer, const NodeMap& nodes, const QpnsBySet& qpns,
                                    const std::vector<rdma::ConnWindow>& windows, const verbs::ServiceLevels& levels) {
  rdma::ConnRecord r;
  r.rank = rank;
  r.peer = peer;
  r.num_ranks = static_cast<int32_t>(nodes.node_of.size());
  r.node = nodes.node_of[rank];
  for (int set = 0; set < rdma::kNumQpSets; ++set) {
    r.num_qps[set] = 1;  // per peer, the same on every rank; the pairs without QPs say so with QPN 0
    r.qpn[set][0] = qpns[set];
    r.sl[set] = serviceLevelOf(levels, set).sl;
    r.traffic_class[set] = serviceLevelOf(levels, set).traffic_class;
  }
  r.num_windows = static_cast<uint16_t>(windows.size());
  for (size_t w = 0; w < windows.size() && w < static_cast<size_t>(rdma::kConnMaxWindows); ++w)
    r.windows[w] = windows[w];
  return r;
}

ncclResult_t peerWindowOf(const rdma::ConnRecord& record, PeerWindow* out) {
  if (record.num_windows < 1)
    return setLastError(ncclInvalidUsage, "rank %d's connection record for rank %d lists no window", record.rank,
                        record.peer);
  const rdma::ConnWindow& data = record.windows[0];
  PeerWindow w;
  w.base = data.addr;
  w.bytes = data.bytes;
  w.rkey = data.rkey;
  *out = w;
  return ncclSuccess;
}

ncclResult_t readPeerRecords(const uint8_t* all, size_t stride, size_t records_offset, const NodeMap& nodes, int me,
                             const std::vector<int>& peers, const std::string& what,
                             std::vector<rdma::ConnRecord>* records, std::vector<PeerWindow>* windows) {
  const int num_ranks = static_cast<int>(nodes.node_of.size());
  records->assign(num_ranks, rdma::ConnRecord{});
  windows->assign(num_ranks, PeerWindow{});
  for (int r = 0; r < num_ranks; ++r) {
    const uint8_t* rec = all + stride * r + records_offset + static_cast<size_t>(me) * rdma::kConnRecordBytes;
    const ncclResult_t res = rdma::unpackConnRecord(rec, rdma::kConnRecordBytes, &(*records)[r]);
    if (res != ncclSuccess) {
      const std::string why = threadLastError();
      return setLastError(res, "%s: %s", what.c_str(), why.c_str());
    }
  }
  const ncclResult_t agreed = rdma::checkConnRecords(records->data(), num_ranks, me);
  if (agreed != ncclSuccess) {
    const std::string why = threadLastError();
    return setLastError(agreed, "%s: %s", what.c_str(), why.c_str());
  }
  for (int p : peers) {
    const rdma::ConnRecord& rec = (*records)[p];
    if (rec.node != nodes.node_of[p])
      return setLastError(ncclInvalidUsage, "%s: rank %d's record names node %d; the node map has it on node %d",
                          what.c_str(), p, rec.node, nodes.node_of[p]);
    for (int set = 0; set < rdma::kNumQpSets; ++set)
      if (rec.num_qps[set] < 1 || rec.qpn[set][0] == 0)
        return setLastError(ncclInvalidUsage, "%s: rank %d's record lists no %s QP for rank %d; expected one",
                            what.c_str(), p, rdma::qpSetName(set), me);
    const ncclResult_t w = peerWindowOf(rec, &(*windows)[p]);
    if (w != ncclSuccess) {
      const std::string why = threadLastError();
      return setLastError(w, "%s: %s", what.c_str(), why.c_str());
    }
  }
  return ncclSuccess;
}

}  // namespace nccl_moe
