// The software NIC as one communicator rank's scale-out transport (NCCL_MOE_NET=emulated, src/transport/
// net_choice.h): what communicator init builds for a rank whose peers include ranks of other (virtual) nodes, in a
// world whose ranks are threads of one process on one GPU. Per rank:
//
//   registry  a WindowRegistry (this rank's memory domain; key tag 0x40 + rank, so keys of different ranks differ)
//   window    the whole communication buffer, one registration with every remote right, strongly ordered (no
//             relaxed ordering: it holds signal words too)
//   backend   a CudaMemoryBackend on the rank's GPU (staging arena, a stream per QP, helper kernels loaded here)
//   NIC       a SoftNic executing this rank's send queues (chaos seed NCCL_MOE_EMU_CHAOS + rank when set)
//   QPs       one QP per (remote peer, QP set), i.e. two per (rank, peer on another node): the high-throughput
//             (general) set and the low-latency set (scaleout_table.h), each with its set's SL / TC in the records
//             (the software NIC has no wire: the values are carried and checked, not applied); none for self and
//             own-node peers.
//             NCCL_MOE_NET_MODE=ibgda: GPU-driven QPs (EmulatedGpuQp: the kernels write WQEs and ring doorbells);
//             dbproxy: the same GPU-driven QPs, but the GPU rings a mailbox word and a CPU thread of the rank (the
//             doorbell proxy, src/transport/rdma/dbproxy/doorbell_proxy.h) forwards it to the NIC's doorbell;
//             proxy: host-memory QPs behind one request-proxy ring PER SET (EmulatedGpuProxy: the kernels write
//             descriptors, a CPU thread per ring turns them into WQEs). One ring per set because a ring is consumed
//             in order and a descriptor whose SQ is full stays at its head: on a shared ring an LL descriptor would
//             wait behind HT descriptors stalled on their SQ, the head-of-line blocking the sets exist to avoid.
//   table     the device-resident ScaleoutPeer[num_ranks] kernels reach through DeviceComm::scaleout.peers
//             (src/transport/scaleout_table.h)
//
// Connection goes the way the verbs backend will: every rank creates its QPs unconnected, then publishes one
// connection record per peer (src/transport/rdma/conn_record.h: its QPN toward that peer and its window) in one
// all-gather through the bootstrap; each rank checks the records addressed to it (checkConnRecords) and connects
// each QP to the peer's QPN and window. What only the in-process world needs in addition is the address of the
// peer's WindowRegistry (the software NIC checks remote references against the responder's registrations), carried
// next to the records. A peer in another process (same GPU, several processes each its own node) is reached
// through a mirror of its registry built from its record (WindowRegistry::mirror) and its buffer opened with CUDA
// IPC (the handle travels in the record header), which the CUDA memory backend places through (mapPeer).
//
// Lifetime: stop() ends the executor (bounded: about a millisecond plus one action, whose completion wait is
// bounded by the communicator's timeout); the destructor stops, then frees QPs, NIC, backend, table and registry,
// in that order. The communication buffer must outlive the object (comm.cc releases the transport first).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/node_map.h"
#include "device/device_comm.h"
#include "device/limits.h"
#include "transport/emulated/cuda_backend.h"
#include "transport/emulated/gpu_queues.h"
#include "transport/emulated/nic.h"
#include "transport/emulated/proxy_queues.h"
#include "transport/rdma/conn_record.h"
#include "transport/rdma/dbproxy/doorbell_proxy.h"
#include "transport/rdma/verbs/qp_attr.h"
#include "transport/rdma/window.h"
#include "transport/scaleout_setup.h"
#include "transport/scaleout_table.h"

namespace nccl_moe::emulated {

struct CommTransportSpec {
  int rank = -1;
  int device = -1;
  NodeMap nodes;
  uint8_t* buffer = nullptr;   // this rank's communication buffer (device memory, cudaMalloc: IPC-exportable)
  uint64_t process_token = 0;  // processToken() of this process
  uint64_t buffer_bytes = 0;
  ErrorRecord* dev_error = nullptr;  // device view of the rank's error record (what the QPs' waits report into)
  uint64_t timeout_ns = 0;           // bound of every device wait on the QPs and of the backend's completion waits
  uint64_t chaos_seed = 0;           // 0: chaos off; else rank r's NIC uses chaos_seed + r
  uint32_t wqe_cnt = 64;             // per QP
  bool proxy = false;                // NCCL_MOE_NET_MODE=proxy: the request proxy posts for the kernels
  bool doorbell_proxy = false;       // NCCL_MOE_NET_MODE=dbproxy: a CPU thread forwards the GPU's doorbells
  bool pure_rdma = false;            // NCCL_MOE_NET_PURE_RDMA: QPs to the ranks of this node too
  uint32_t proxy_slots = 256;        // descriptors of each set's request-proxy ring (a power of two)
  verbs::EnvLookup env = verbs::processEnvLookup;  // where the QP sets' SL / TC come from (resolveServiceLevels)
};

// What a rank publishes in the scale-out exchange: this header (its first fields are ScaleoutRecordHead's), then
// one packed connection record per peer ([peer] the record addressed to that peer),
// commTransportRecordBytes(num_ranks) bytes in all.
struct CommTransportRecordHeader {
  int32_t status;                 // ncclResult_t of this rank's create() (set by setupScaleout before the exchange)
  int32_t num_records;            // ranks of the communicator
  uint64_t registry;              // address of the rank's WindowRegistry: meaningful only inside this process
  uint64_t process_token;         // processToken() of the rank's process: which ranks share this address space
  cudaIpcMemHandle_t buffer_ipc;  // the communication buffer, for ranks of other processes on this GPU
};
constexpr size_t commTransportRecordBytes(int num_ranks) {
  return sizeof(CommTransportRecordHeader) + static_cast<size_t>(num_ranks) * rdma::kConnRecordBytes;
}

// The connection record `rank` sends `peer` (pure): scaleoutConnRecord's fields (one QP per set: QPN qpns[set], 0
// where the pair has none: self and own-node peers; the one buffer window; each set's SL / TC) and the software
// NIC's name "emulated-<rank>", port 1, InfiniBand link layer.
rdma::ConnRecord emulatedConnRecord(int rank, int peer, const NodeMap& nodes, const QpnsBySet& qpns,
                                    const rdma::ConnWindow& window, const verbs::ServiceLevels& levels);

class CommTransport : public ScaleoutTransport {
 public:
  // Local: registry, window, backend, NIC, unconnected QPs; fills `mine` (commTransportRecordBytes(num_ranks)
  // bytes, zeroed by the caller) except the header's status.
  static ncclResult_t create(const CommTransportSpec& spec, std::unique_ptr<CommTransport>* out, uint8_t* mine);
  ~CommTransport() override;
  CommTransport(const CommTransport&) = delete;
  CommTransport& operator=(const CommTransport&) = delete;

  // With every rank's record (rank r's at all + r * commTransportRecordBytes(num_ranks)): checks the records
  // addressed to this rank, connects every QP, uploads the table and starts the executor.
  ncclResult_t connect(const uint8_t* all) override;
  // Waits (bounded by the spec's timeout) until the NIC has executed every WQE this rank's GPU announced on each QP
  // (or the QP is in error; proxy mode: until the proxy completed every descriptor the GPU posted): what a rank must do
  // before it stops its NIC, since a kernel returns as soon as it has posted, and its last WRITEs and signals (an LL
  // combine's partials, a receive half's acks) are still the NIC's to carry. Returns "" or which QPs still had work
  // when the bound expired.
  std::string drain() override;
  void stop() override;

  const ScaleoutPeer* deviceTable() const override { return dev_table_; }
  int numQps() const override;  // both sets
  const verbs::ServiceLevels& serviceLevels() const override { return levels_; }
  SoftNic& nic() { return *nic_; }
  const CudaMemoryBackend& backend() const { return *backend_; }
  const rdma::Window& window() const override { return window_; }
  // "rank r: software NIC (chaos seed s), N QPs (2 sets) to peers a b c, backend ok|<its error>" (dbproxy: and
  // what the doorbell proxy forwarded)
  std::string describe() const override;

 private:
  CommTransport() = default;
  // A remote peer in another process: mirror its windows from `rec`, open its buffer from `ipc`, map it in the
  // backend; *windows = the mirror.
  ncclResult_t mapOtherProcess(int peer, const rdma::ConnRecord& rec, const cudaIpcMemHandle_t& ipc,
                               const rdma::WindowRegistry** windows);
  CommTransportSpec spec_;
  std::unique_ptr<rdma::WindowRegistry> registry_;
  std::unique_ptr<CudaMemoryBackend> backend_;
  std::unique_ptr<SoftNic> nic_;
  rdma::Window window_{};
  verbs::ServiceLevels levels_;
  // ibgda: [set][peer], null for self and own-node peers
  std::array<std::vector<std::unique_ptr<EmulatedGpuQp>>, rdma::kNumQpSets> qps_;
  // dbproxy: forwards every QP's mailbox to its doorbell, on its own thread (started by connect())
  std::unique_ptr<dbproxy::DoorbellProxy> doorbells_;
  // proxy: one ring per set, its QP i to remote_peers_[i]
  std::array<std::unique_ptr<EmulatedGpuProxy>, rdma::kNumQpSets> proxies_;
  std::vector<int> remote_peers_;  // the ranks with QPs, ascending: other nodes (pure RDMA: all but this rank)
  // Remote peers in other processes (same GPU): a mirror of each one's window registry (from its record) and its
  // buffer opened through CUDA IPC, closed after the NIC stopped.
  std::vector<std::unique_ptr<rdma::WindowRegistry>> mirrors_;
  std::vector<void*> ipc_buffers_;
  ScaleoutPeer* dev_table_ = nullptr;
};

}  // namespace nccl_moe::emulated
