// What every scale-out transport does the same way at communicator init, whatever builds its QPs (the software
// NIC, src/transport/emulated/comm_transport.h, or the verbs backend, src/transport/rdma/verbs/comm_transport.h):
// which peers get QPs, the transport-independent fields of the connection records (ranks, node, one QPN per QP set,
// windows, each set's service level and traffic class), reading and checking the records addressed to this rank,
// and the one INFO line naming each QP set's SL/TC. Pure functions; tests/unit/scaleout_table_test.cc.
#pragma once

#include <nccl.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/node_map.h"
#include "transport/rdma/conn_record.h"
#include "transport/rdma/verbs/qp_attr.h"
#include "transport/scaleout_table.h"

namespace nccl_moe {

// The ranks `rank` creates QPs to, ascending: the ranks of other nodes; with pure_rdma (NCCL_MOE_NET_PURE_RDMA)
// every rank but itself. Each gets one QP per set (rdma::kNumQpSets).
std::vector<int> qpPeers(const NodeMap& nodes, int rank, bool pure_rdma);

// [set] the QPN of a rank's QP of that set toward one peer; 0 where the pair has none.
using QpnsBySet = std::array<uint32_t, rdma::kNumQpSets>;

// The set's service level (general for the high-throughput set, low_latency for the low-latency one).
const verbs::ServiceLevel& serviceLevelOf(const verbs::ServiceLevels& levels, int set);
// "high-throughput set SL 3 (NCCL_MOE_IB_SL), TC 0 (default); low-latency set SL 5 (NCCL_MOE_IB_LL_SL), TC 0
// (default)": what init logs at INFO once per communicator.
std::string describeQpSets(const verbs::ServiceLevels& levels);

// The record `rank` sends `peer`, without the NIC fields (name, GUID, port, link layer, MTU, LID, GID, PSN: the
// transport fills them): ranks, node, one QP per set (QPN qpns[set], 0 where the pair has none), `windows`, and the
// SL / TC of each set.
rdma::ConnRecord scaleoutConnRecord(int rank, int peer, const NodeMap& nodes, const QpnsBySet& qpns,
                                    const std::vector<rdma::ConnWindow>& windows, const verbs::ServiceLevels& levels);

// The peer's buffer window as its record announces it: windows[0] (base, bytes, rkey).
ncclResult_t peerWindowOf(const rdma::ConnRecord& record, PeerWindow* out);

// The records addressed to `me`: rank r's record for me is at all + r * stride + records_offset + me *
// rdma::kConnRecordBytes. Unpacks them, checks them together (rdma::checkConnRecords: every rank sees the same
// disagreements), then checks each rank in `peers`: its node as the node map has it, a QPN in every set, a window.
// `what` starts each message ("verbs transport of rank 0"). Fills records[num_ranks] and windows[num_ranks]
// (entries of `peers` only).
ncclResult_t readPeerRecords(const uint8_t* all, size_t stride, size_t records_offset, const NodeMap& nodes, int me,
                             const std::vector<int>& peers, const std::string& what,
                             std::vector<rdma::ConnRecord>* records, std::vector<PeerWindow>* windows);

}  // namespace nccl_moe
