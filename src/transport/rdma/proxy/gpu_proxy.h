// One request-proxy ring as the GPU drives it (design notes §3.2): a trivially copyable view kernels receive by
// value, and the host code that builds and checks it. The device functions that post on it are proxy.cuh; the
// CPU thread that consumes the ring is proxy_thread.h (around rdma::RequestProxy).
//
// Where things live (rdma/proxy_ring.h has the descriptor format and the index arithmetic):
//   slots           num_slots 64-byte descriptors in pinned host memory, mapped into the GPU (device address)
//   producer_index  device memory: the next sequence number to reserve (GPU atomics only, never read by the CPU
//                   while kernels run)
//   shared          the consumer's words (consumed, completed, error), pinned host memory mapped into the GPU;
//                   the CPU thread stores them with release order, the GPU loads them with acquire, system scope
//
// A view names one QP of the ring (qp: the consumer's QP index, qpn: its QP number, for error records only) and
// the source window its puts gather from (lkey). Several views of one ring (one per QP) share its slots and
// indices: ring order is the order the proxy posts in, the NIC keeps order only within a QP.
//
// Memory is named by (key, offset), as the descriptors carry it: the GPU never needs addresses of the peer.
#pragma once

#include <cstdint>
#include <string>

#include "device/device_comm.h"
#include "transport/rdma/proxy_ring.h"

namespace nccl_moe::proxy {

struct GpuProxyQp {
  rdma::ProxyDesc* slots;               // device address of the mapped slots
  uint32_t num_slots;                   // power of two
  uint32_t* producer_index;             // device memory
  const rdma::ProxyRingShared* shared;  // device address of the mapped consumer words
  uint16_t qp;                          // the consumer's QP index this view posts on
  uint32_t qpn;                         // that QP's number (error records only)
  uint32_t lkey;                        // the source window every put gathers from
  int rank;                             // this rank and the QP's peer: what an error record names
  int peer;
  uint64_t timeout_ns;  // bound of every wait
  ErrorRecord* error;   // host-mapped record the device writes on failure (device_comm.h)
};

// What the host gathers to build a view.
struct GpuProxyRingMemory {
  rdma::ProxyDesc* slots = nullptr;  // device address
  uint32_t num_slots = 0;
  uint32_t* producer_index = nullptr;             // device address
  const rdma::ProxyRingShared* shared = nullptr;  // device address
};
struct GpuProxyBinding {
  uint32_t qp = 0;
  uint32_t qpn = 0;
  uint32_t src_lkey = 0;
  int rank = -1;
  int peer = -1;
  uint64_t timeout_ns = 0;
  ErrorRecord* error = nullptr;  // device address of the record
};

// Builds the view; returns "" or what is wrong (null pointers, a ring size that is not a power of two in range,
// misaligned slots or shared words, a QP index beyond 16 bits, a QPN beyond 24 bits, a zero timeout).
std::string buildGpuProxyQp(const GpuProxyRingMemory& ring, const GpuProxyBinding& binding, GpuProxyQp* out);

// Name of a ProxyError value ("translation", ...; "unknown" outside the enum).
const char* proxyErrorName(uint32_t error);

// The message of an ErrorRecord of the request proxy (code kErrNetProxy, or kErrTimeout in the phases
// kNetProxy*; other records get describeNetError's generic line): phase, rank, peer, QP, the indices, the ring's
// error. `timeout_ns` is the bound the waits used (for the message only).
std::string describeProxyError(const ErrorRecord& record, uint64_t timeout_ns);

}  // namespace nccl_moe::proxy
