// What every scale-out transport does the same way at communicator init, whatever builds its QPs (the software
// NIC, src/transport/emulated/comm_transport.h, or the verbs backend, src/transport/rdma/verbs/comm_transport.h):
// which peers get QPs, the transport-independent fields of the connection records (ranks, node, one QPN per QP set,
// windows, each set's service level and traffic class), reading and checking the records addressed to this rank,
// the one INFO line naming each QP set's SL/TC, and the init step itself (setupScaleout: local creation, the
// exchange of records through the bootstrap, connection, agreement) over the ScaleoutTransport interface both
// implement. Tests: tests/unit/scaleout_table_test.cc (the pure steps), tests/unit/verbs_comm_test.cc (the step
// over in-process worlds of fake verbs devices).
#pragma once

#include <nccl.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/bootstrap.h"
#include "core/node_map.h"
#include "transport/rdma/conn_record.h"
#include "transport/rdma/verbs/qp_attr.h"
#include "transport/rdma/window.h"
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

// The peer's buffer window as its record announces it: windows[0] is the data window (base, bytes, rkey); a second
// window, when there is one, covers the same bytes for the signal words (signal_rkey), else signal_rkey = rkey.
ncclResult_t peerWindowOf(const rdma::ConnRecord& record, PeerWindow* out);

// The records addressed to `me`: rank r's record for me is at all + r * stride + records_offset + me *
// rdma::kConnRecordBytes. Unpacks them, checks them together (rdma::checkConnRecords: every rank sees the same
// disagreements), then checks each rank in `peers`: its node as the node map has it, a QPN in every set, a window.
// `what` starts each message ("verbs transport of rank 0"). Fills records[num_ranks] and windows[num_ranks]
// (entries of `peers` only).
ncclResult_t readPeerRecords(const uint8_t* all, size_t stride, size_t records_offset, const NodeMap& nodes, int me,
                             const std::vector<int>& peers, const std::string& what,
                             std::vector<rdma::ConnRecord>* records, std::vector<PeerWindow>* windows);

// One communicator rank's scale-out transport, as init, destroy and the host operations use it.
class ScaleoutTransport {
 public:
  virtual ~ScaleoutTransport() = default;
  // With every rank's published bytes (rank r's at all + r * the size setupScaleout was given): checks the
  // records addressed to this rank, connects every QP, uploads the table (and starts what must run).
  virtual ncclResult_t connect(const uint8_t* all) = 0;
  // Before stop(): waits (bounded) until the work the GPU posted is carried out; "" or what was still pending.
  virtual std::string drain() = 0;
  virtual void stop() = 0;
  virtual const ScaleoutPeer* deviceTable() const = 0;  // device memory, [num_ranks]
  virtual int numQps() const = 0;                       // every set
  virtual const rdma::Window& window() const = 0;       // this rank's buffer as its QPs gather from it
  virtual const verbs::ServiceLevels& serviceLevels() const = 0;
  virtual std::string describe() const = 0;  // one line for INFO and failure logs
};

// The first bytes of what every rank publishes in the scale-out exchange (each transport's header starts so).
struct ScaleoutRecordHead {
  int32_t status;       // ncclResult_t of the rank's local creation (set by setupScaleout)
  int32_t num_records;  // ranks of the communicator (set by the transport)
};

// This rank's local step: creates the transport (into *out, also when it fails part-way, so the caller releases
// what was made in order) and fills `mine` (zeroed, the size setupScaleout was given) but for the head's status.
using ScaleoutCreate = std::function<ncclResult_t(uint8_t* mine, std::unique_ptr<ScaleoutTransport>* out)>;

// The scale-out step of init, on every rank of `bootstrap`: create (local); one all-gather of `bytes` per rank
// in which a rank whose creation failed still takes part with its status; connect (local); one agreement. A
// failure anywhere fails every rank: the failing rank returns its own error, the others ncclRemoteError naming it
// and `kind` ("software NIC", "verbs"). Nothing waits unboundedly beyond the bootstrap's collectives.
// *qp_sets_info: the INFO text of the QP sets' SL / TC (describeQpSets), filled on success.
ncclResult_t setupScaleout(Bootstrap& bootstrap, const char* kind, size_t bytes, const ScaleoutCreate& create,
                           std::unique_ptr<ScaleoutTransport>* out, std::string* qp_sets_info);

}  // namespace nccl_moe
