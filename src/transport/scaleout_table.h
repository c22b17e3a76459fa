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
// buffer (offsets from BufferLayout only) is (remote_base + off, rkey); the source is this rank's own buffer,
// whose lkey every QP carries (qp.lkey). No entry holds a pointer into another node's memory. Kernels post through
// src/transport/scaleout.cuh, which picks the entry's mode.
//
// One QP per (rank, remote peer): HT and LL QP sets with their own service levels come with the internode kernels
// (issue 14); ibgda.cuh lets any number of threads post on one QP.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/node_map.h"
#include "transport/rdma/ibgda/gpu_qp.h"
#include "transport/rdma/proxy/gpu_proxy.h"

namespace nccl_moe {

struct ScaleoutPeer {
  ibgda::GpuQp qp;          // ibgda mode: this rank's GPU-driven QP to the peer (meaningful only when valid)
  proxy::GpuProxyQp proxy;  // proxy mode: this rank's request-proxy view of its QP to the peer
  uint64_t remote_base;     // the peer's buffer window base as the QP addresses it (iova; never dereferenced)
  uint64_t window_bytes;    // its size (the communication buffer's total_bytes)
  uint32_t rkey;            // the window's remote key
  uint32_t valid;           // 1: a rank of another node; 0: self or a rank of this node
  uint32_t via_proxy;       // 1: post through `proxy`; 0: through `qp`
  uint32_t reserved;
};

// The peers of `rank` on other nodes, ascending: the ranks that get a QP.
std::vector<int> remotePeers(const NodeMap& nodes, int rank);

// A peer's buffer window as its connection record announced it.
struct PeerWindow {
  uint64_t base = 0;
  uint64_t bytes = 0;
  uint32_t rkey = 0;
};

// The table of `rank` (size = ranks of `nodes`): entry p valid iff p is on another node, then holding
// *qp_of_peer[p] and window_of_peer[p]. Returns "" or what is wrong (sizes, a remote peer without a QP or with a
// zero rkey or size, an own-node peer with a QP, a QP whose peer field is not p or whose rank is not `rank`).
// same_node_qps (pure-RDMA mode): the other ranks of this rank's node have QPs and valid entries too.
std::string buildScaleoutTable(const NodeMap& nodes, int rank, const std::vector<const ibgda::GpuQp*>& qp_of_peer,
                               const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                               bool same_node_qps = false);
// The same for the proxy mode: entry p holds *proxy_of_peer[p] (via_proxy = 1), with the same checks on its rank
// and peer.
std::string buildProxyScaleoutTable(const NodeMap& nodes, int rank,
                                    const std::vector<const proxy::GpuProxyQp*>& proxy_of_peer,
                                    const std::vector<PeerWindow>& window_of_peer, std::vector<ScaleoutPeer>* out,
                                    bool same_node_qps = false);

}  // namespace nccl_moe
