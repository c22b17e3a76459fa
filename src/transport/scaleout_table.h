// The scale-out table kernels use to reach the ranks of other nodes: one ScaleoutPeer per rank of the
// communicator (index = peer rank), in device memory, reached through DeviceComm::scaleout.peers
// (src/device/device_comm.h). An entry is valid only for a rank of another node; self and own-node ranks are
// invalid there (kernels reach them through DeviceComm::scaleup).
//
// An entry holds this rank's QP to the peer -- a GPU-driven QP (ibgda::GpuQp, NCCL_MOE_NET_MODE=ibgda: what
// ibgda.cuh's put / put_signal / signal / quiet take) or a request-proxy view (proxy::GpuProxyQp,
// NCCL_MOE_NET_MODE=proxy: descriptors a CPU thread turns into WQEs, proxy.cuh) -- and the peer's
// communication-buffer window as that QP addresses it: rkey and base (the registration's
// iova, an integer the NIC translates) plus its size. The target of a put at byte offset `off` of the peer's
// buffer (offsets from BufferLayout only) is (remote_base + off, rkey), of a fetch-add (remote_base + off,
// signal_rkey): data may be registered with relaxed ordering, signal words never; the source is this rank's own buffer,
// whose lkey every QP carries (qp.lkey). No entry holds a pointer into another node's memory. Kernels post through
// src/transport/scaleout.cuh, which picks the entry's mode.
//
// QP sets: an entry holds one QP per set (rdma::QpSet), each its own RC connection to the peer with the set's
// service level and traffic class (verbs::resolveServiceLevels; carried in the connection records), so that the
// fabric can put the two kinds of traffic on different virtual lanes / priorities:
//   [rdma::kQpSetHighThroughput]  the general set: the internode HT kernels, and every call that names no set
//                                 (NCCL_MOE_IB_SL / NCCL_MOE_IB_TC)
//   [rdma::kQpSetLowLatency]      the internode LL kernels (NCCL_MOE_IB_LL_SL / NCCL_MOE_IB_LL_TC)
// Both sets reach the same peer window: data through `rkey`, fetch-adds through `signal_rkey` (on hardware the same
// buffer registered twice, relaxed ordering for data only); ibgda.cuh lets any number of threads post on one QP.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "core/node_map.h"
#include "transport/rdma/conn_record.h"
#include "transport/rdma/ibgda/gpu_qp.h"
#include "transport/rdma/proxy/gpu_proxy.h"

namespace nccl_moe {

struct ScaleoutPeer {
  ibgda::GpuQp qp[rdma::kNumQpSets];          // ibgda mode: this rank's GPU-driven QP of each set to the peer
                                              // (meaningful only when valid)
  proxy::GpuProxyQp proxy[rdma::kNumQpSets];  // proxy mode: this rank's request-proxy view of each set's QP
  uint64_t remote_base;   // the peer's buffer window base as the QP addresses it (iova; never dereferenced)
  uint64_t window_bytes;  // its size (the communication buffer's total_bytes)
  uint32_t rkey;          // the window's remote key (data: puts)
  uint32_t valid;         // 1: a rank of another node; 0: self or a rank of this node
  uint32_t via_proxy;     // 1: post through `proxy`; 0: through `qp`
  uint32_t signal_rkey;   // the key of the fetch-adds' targets: the same bytes registered strongly ordered (verbs:
                          // a second registration; the software NIC: = rkey, its one window is strongly ordered)
};
static_assert(std::is_trivially_copyable<ScaleoutPeer>::value, "the table is copied to device memory as bytes");

// [set][peer rank]: the QP of each set toward each peer (null where the pair has none).
template <typename Qp>
using QpsBySet = std::array<std::vector<const Qp*>, rdma::kNumQpSets>;

// The peers of `rank` on other nodes, ascending: the ranks that get a QP.
std::vector<int> remotePeers(const NodeMap& nodes, int rank);

// A peer's buffer window as its connection record announced it.
struct PeerWindow {
  uint64_t base = 0;
  uint64_t bytes = 0;
  uint32_t rkey = 0;
  uint32_t signal_rkey = 0;  // 0: rkey (one window for data and signals)
};

// The table of `rank` (size = ranks of `nodes`): entry p valid iff p is on another node, then holding
// *qp_of_peer[s][p] for every set s and window_of_peer[p]. Returns "" or what is wrong (sizes, a remote peer
// without a QP in some set or with a zero rkey or size, an own-node peer with a QP, a QP whose peer field is not p
// or whose rank is not `rank`, one QP in two sets), naming the peer and the set.
// same_node_qps (pure-RDMA mode): the other ranks of this rank's node have QPs and valid entries too.
std::string buildScaleoutTable(const NodeMap& nodes, int rank, const QpsBySet<ibgda::GpuQp>& qp_of_peer,
                               const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                               bool same_node_qps = false);
// The same for the proxy mode: entry p holds *proxy_of_peer[s][p] (via_proxy = 1), with the same checks.
std::string buildProxyScaleoutTable(const NodeMap& nodes, int rank, const QpsBySet<proxy::GpuProxyQp>& proxy_of_peer,
                                    const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                                    bool same_node_qps = false);

}  // namespace nccl_moe
