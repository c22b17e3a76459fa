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
// Only NCCL_MOE_NET_MODE=ibgda: the request proxy over verbs QPs (ibv_post_send from the proxy thread) is not built
// and net_choice refuses it before this is reached.
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

struct CommTransportSpec {
  int rank = -1;
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

// What a rank publishes: ScaleoutRecordHead (the verbs backend needs nothing more in its header), then one packed
// connection record per peer, commTransportRecordBytes(num_ranks) bytes.
constexpr size_t commTransportRecordBytes(int num_ranks) {
  return sizeof(ScaleoutRecordHead) + static_cast<size_t>(num_ranks) * rdma::kConnRecordBytes;
}

class CommTransport : public ScaleoutTransport {
 public:
  // Local: tables, SL / TC, device, windows, state, QPs in RESET; fills `mine` but for the header's status. On
  // failure *out still holds what was made (its destructor frees it).
  static ncclResult_t create(const CommTransportSpec& spec, std::unique_ptr<CommTransport>* out, uint8_t* mine);
  ~CommTransport() override;
  CommTransport(const CommTransport&) = delete;
  CommTransport& operator=(const CommTransport&) = delete;

  ncclResult_t connect(const uint8_t* all) override;
  std::string drain() override { return ""; }
  void stop() override {}
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
};

}  // namespace nccl_moe::verbs
