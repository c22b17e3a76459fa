// The verbs backend as one communicator rank's scale-out transport (NCCL_MOE_NET=ib, or auto across machines;
// src/transport/net_choice.h): hardware RC QPs the GPU drives (IBGDA), built with the host layer of this directory
// (device.h, memory.h, rc_qp.h) and connected through the same steps as the software NIC's transport
// (src/transport/scaleout_setup.h: records, their checks, the table). Per rank:
//
//   device    Device::open: the NIC paired with the rank's GPU (NCCL_MOE_IB_HCA overrides), port, GID, PD
//   windows   the communication buffer registered twice: the DATA window with relaxed ordering (puts), the SIGNAL
//             window strongly ordered (fetch-adds: a signal must not pass the data before it on PCIe); both at
//             iova = the buffer's address, so one remote base serves both keys
//   state     one device block of GpuQpState per QP (ibgda/gpu_qp.h: indices, lock, the fetch-add result word),
//             registered local-write as its own window (the result words' lkey)
//   QPs       one RcQp per (remote peer, QP set), RESET until connect(); each set's SL / TC from
//             resolveServiceLevels go into its QPs' RTR attributes
//   table     ScaleoutPeer[num_ranks] in device memory: the QPs' GpuQp views, each peer's base and both keys
//
// Doorbells (`doorbell`): the GPU rings the UAR it has mapped (NCCL_MOE_NET_MODE=ibgda), or a mailbox that a CPU
// thread of the rank forwards to the UAR (dbproxy, src/transport/rdma/dbproxy/doorbell_proxy.h), or -- the mode
// unset -- the UAR where every rank could map it and the doorbell proxy on EVERY rank as soon as one rank could not
// (cudaHostRegister(IoMemory) refused: the driver does not allow MMIO peer mappings). Each rank publishes whether it
// needs the proxy in its record header; connect() decides the same way on every rank, switches its views to the
// mailboxes before the table is uploaded, starts the proxy thread, and rank 0 logs the outcome. The wire is the same
// either way. The request proxy over verbs QPs (ibv_post_send from the proxy thread) is not built and net_choice
// refuses it before this is reached.
//
// Every rdma-core call goes through the IbvApi / Mlx5Api tables and every CUDA call through CudaOps, so unit tests
// run whole worlds of fake devices (tests/unit/verbs_comm_test.cc). Status: never run on a NIC.
//
// Lifetime: the destructor frees the table, the QPs (GPU mappings, QP, CQ), the registrations, the state block
// and the device, in that order. drain() does not wait for the NIC (the GPU owns the CQs); the communication
// buffer must outlive the object.
#pragma once

#include <nccl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/node_map.h"
#include "device/device_comm.h"
#include "transport/rdma/conn_record.h"
#include "transport/rdma/dbproxy/doorbell_proxy.h"
#include "transport/rdma/ibgda/gpu_qp.h"
#include "transport/rdma/verbs/device.h"
#include "transport/rdma/verbs/loader.h"
#include "transport/rdma/verbs/memory.h"
#include "transport/rdma/verbs/qp_attr.h"
#include "transport/rdma/verbs/rc_qp.h"
#include "transport/rdma/window.h"
#include "transport/scaleout_setup.h"
#include "transport/scaleout_table.h"

namespace nccl_moe::verbs {

// Who rings the doorbells (see above).
enum class DoorbellPath : int {
  kGpu = 0,           // NCCL_MOE_NET_MODE=ibgda: the UAR must map
  kProxy = 1,         // NCCL_MOE_NET_MODE=dbproxy: the UAR is not mapped to the GPU
  kGpuElseProxy = 2,  // unset: the UAR where every rank maps it, else the doorbell proxy on every rank
};

struct CommTransportSpec {
  int rank = -1;
  DoorbellPath doorbell = DoorbellPath::kGpuElseProxy;
  NodeMap nodes;
  bool pure_rdma = false;     // NCCL_MOE_NET_PURE_RDMA: QPs to the ranks of this node too
  uint8_t* buffer = nullptr;  // this rank's communication buffer (device memory)
  uint64_t buffer_bytes = 0;
  ErrorRecord* dev_error = nullptr;  // device view of the rank's error record
  uint64_t timeout_ns = 0;           // bound of every device wait on the QPs
  uint32_t max_send_wr = 64;         // per QP
  uint32_t first_psn = 0;            // sq_psn of every QP (24 bits)
  bool force_peer_memory = false;    // register with ibv_reg_mr even where dma-buf works (bring-up)
  // The rdma-core tables; null: the loader's (ibverbs(), mlx5()), whose failure is this rank's error.
  const IbvApi* ibv = nullptr;
  const Mlx5Api* mlx5 = nullptr;
  DeviceOptions device;  // env (also of the SL / TC), topology and GPU index for the NIC choice, CudaOps
};

// What a rank publishes: this header (its first fields are ScaleoutRecordHead's), then one packed connection record
// per peer, commTransportRecordBytes(num_ranks) bytes.
struct CommTransportRecordHeader {
  int32_t status;          // set by setupScaleout
  int32_t num_records;     // ranks of the communicator
  int32_t doorbell_proxy;  // 1: this rank needs the doorbell proxy (dbproxy asked, or its UAR could not be mapped)
  int32_t uar_failed;      // 1: its UAR could not be mapped (the reason is in its WARN line)
};
constexpr size_t commTransportRecordBytes(int num_ranks) {
  return sizeof(CommTransportRecordHeader) + static_cast<size_t>(num_ranks) * rdma::kConnRecordBytes;
}

// The doorbell decision every rank takes from every rank's header (pure): true = the doorbell proxy on every rank.
// *text: what rank 0 logs ("GPU doorbells (UAR mapped on every rank)", "doorbell proxy on every rank
// (NCCL_MOE_NET_MODE=dbproxy)", "doorbell proxy on every rank: ranks 1 3 could not map their UAR pages to the GPU").
bool decideDoorbellProxy(const std::vector<CommTransportRecordHeader>& headers, std::string* text);

class CommTransport : public ScaleoutTransport {
 public:
  // Local: tables, SL / TC, device, windows, state, QPs in RESET; fills `mine` but for the header's status. On
  // failure *out still holds what was made (its destructor frees it).
  static ncclResult_t create(const CommTransportSpec& spec, std::unique_ptr<CommTransport>* out, uint8_t* mine);
  ~CommTransport() override;
  CommTransport(const CommTransport&) = delete;
  CommTransport& operator=(const CommTransport&) = delete;

  ncclResult_t connect(const uint8_t* all) override;
  // The GPU owns the CQs: nothing to wait for, but with the doorbell proxy every mailbox word must have been
  // forwarded (bounded by the spec's timeout): "" or the QPs still pending.
  std::string drain() override;
  void stop() override;
  bool doorbellProxy() const { return doorbells_ != nullptr; }
  const ScaleoutPeer* deviceTable() const override { return dev_table_; }
  int numQps() const override;
  const rdma::Window& window() const override;
  const verbs::ServiceLevels& serviceLevels() const override { return levels_; }
  std::string describe() const override;

  const Device& device() const { return *device_; }
  const MemoryRegion& dataWindow() const { return *data_; }
  const MemoryRegion& signalWindow() const { return *signal_; }
  // [set][peer]: this rank's QP, null for self and own-node peers.
  const RcQp* qp(int set, int peer) const { return qps_[set][peer].get(); }

 private:
  CommTransport() = default;
  CommTransportSpec spec_;
  const CudaOps* cuda_ = nullptr;
  ServiceLevels levels_;
  std::vector<int> remote_peers_;
  std::unique_ptr<Device> device_;
  std::unique_ptr<MemoryRegion> data_, signal_, state_window_;
  ibgda::GpuQpState* dev_state_ = nullptr;  // [set * remote_peers_.size() + i]
  std::array<std::vector<std::unique_ptr<RcQp>>, rdma::kNumQpSets> qps_;
  ScaleoutPeer* dev_table_ = nullptr;
  // One mailbox word per QP, 64 bytes apart, page-aligned host memory (mapped to the GPU by each QP); the doorbell
  // proxy and its thread when connect() chose it.
  uint64_t* mailboxes_ = nullptr;
  bool uar_failed_ = false;
  std::string doorbell_text_;
  std::unique_ptr<dbproxy::DoorbellProxy> doorbells_;
};

}  // namespace nccl_moe::verbs
