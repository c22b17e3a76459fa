#include "transport/scaleout_setup.h"

#include <cstdio>
#include <cstring>

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
  w.signal_rkey = data.rkey;
  if (record.num_windows >= 2) {
    const rdma::ConnWindow& sig = record.windows[1];
    if (sig.addr != data.addr || sig.bytes != data.bytes || sig.rkey == 0)
      return setLastError(ncclInvalidUsage,
                          "rank %d's connection record for rank %d: its signal window [0x%llx, +%llu) rkey 0x%x does "
                          "not cover its data window [0x%llx, +%llu)",
                          record.rank, record.peer, static_cast<unsigned long long>(sig.addr),
                          static_cast<unsigned long long>(sig.bytes), sig.rkey,
                          static_cast<unsigned long long>(data.addr), static_cast<unsigned long long>(data.bytes));
    w.signal_rkey = sig.rkey;
  }
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

ncclResult_t setupScaleout(Bootstrap& bootstrap, const char* kind, size_t bytes, const ScaleoutCreate& create,
                           std::unique_ptr<ScaleoutTransport>* out, std::string* qp_sets_info) {
  const int num_ranks = bootstrap.size();
  MOE_ARG_CHECK(bytes >= sizeof(ScaleoutRecordHead), "setupScaleout: %zu bytes per rank", bytes);
  std::vector<uint8_t> mine(bytes, 0), all(bytes * static_cast<size_t>(num_ranks));
  const ncclResult_t created = create(mine.data(), out);
  const std::string create_error = created == ncclSuccess ? std::string() : std::string(threadLastError());
  ScaleoutRecordHead head{};
  std::memcpy(&head, mine.data(), sizeof(head));
  head.status = static_cast<int32_t>(created);
  std::memcpy(mine.data(), &head, sizeof(head));
  MOE_CHECK(bootstrap.allGather(mine.data(), all.data(), bytes));
  if (created != ncclSuccess) return setLastError(created, "ncclMoeCommInit: %s", create_error.c_str());
  for (int r = 0; r < num_ranks; ++r) {
    std::memcpy(&head, all.data() + bytes * r, sizeof(head));
    if (head.status != ncclSuccess) {
      return setLastError(ncclRemoteError,
                          "ncclMoeCommInit: rank %d failed to set up its scale-out transport (%s) (%s); see that "
                          "rank's error",
                          r, kind, ncclGetErrorString(static_cast<ncclResult_t>(head.status)));
    }
  }
  const ncclResult_t connected = (*out)->connect(all.data());
  const std::string connect_error = connected == ncclSuccess ? std::string() : std::string(threadLastError());
  bool any_failed = false;
  MOE_CHECK(bootstrap.agree(connected != ncclSuccess, &any_failed));
  if (connected != ncclSuccess) return setLastError(connected, "ncclMoeCommInit: %s", connect_error.c_str());
  if (any_failed) {
    return setLastError(ncclRemoteError,
                        "ncclMoeCommInit: another rank failed to connect its scale-out QPs (%s; see that rank's error)",
                        kind);
  }
  if (qp_sets_info != nullptr) *qp_sets_info = describeQpSets((*out)->serviceLevels());
  return ncclSuccess;
}

}  // namespace nccl_moe
