// One hardware RC QP that the GPU drives (IBGDA, design notes §2.1 "Path A": libmlx5 owns the queues): created with
// verbs, opened with mlx5 direct verbs, its queues made visible to the GPU, and connected through the RC state
// machine. The result is the same ibgda::GpuQp view the software NIC's QPs give kernels (gpu_qp.h).
//
// Contract
//   - Creation: ibv_create_cq (cqe_cnt entries asked), ibv_create_qp (RC, send and receive CQ the same, no receive
//     queue, one gather entry, max_inline_data 28 -- what the inline WRITE of mlx5/wqe.h needs -- and sq_sig_all 0:
//     the GPU asks for each CQE itself), then mlx5dv_init_obj(QP | CQ) for the SQ buffer, doorbell record, BlueFlame
//     register (the UAR doorbell), CQ buffer and CQ doorbell record. From then on only the GPU posts and polls.
//   - Checks on what libmlx5 made (an error naming the value, never a silent mismatch): 64-byte WQEBBs and CQEs (a
//     128-byte CQE, MLX5_CQE_SIZE=128, is refused: the GPU poller reads 64-byte entries), power-of-two ring
//     sizes within mlx5/ring.h's and cqe.h's limits, CQ entries >= SQ WQEBBs (every GPU WQE is signaled, so the CQ
//     cannot overrun: libmlx5 may give the SQ more WQEBBs than WRs asked, hence the larger default CQ), every CQE
//     initialised INVALID (the first lap valid with owner 0, bring-up checklist item 7), a 24-bit QPN.
//   - GPU visibility through the device's HostMapper: SQ buffer, doorbell record page, CQ buffer, CQ doorbell
//     record page (cudaHostRegister Mapped | Portable) and the UAR page (| IoMemory). Doorbell proxy
//     (NCCL_MOE_NET_MODE=dbproxy, src/transport/rdma/dbproxy/doorbell_proxy.h): the caller's mailbox word is mapped
//     (ordinary memory) and the UAR is not (map_uar false), or its mapping may fail (uar_optional: the reason is
//     kept, uarMapped() is false); the view rings the UAR when it is mapped, else the mailbox; useMailbox() switches
//     a view to the mailbox (every rank uses the proxy when one rank must), route() is what the proxy forwards. The
//     GPU-only state (GpuQpState, device memory) and the window holding its fetch-add result word are the caller's
//     (binding).
//   - connect(): RESET -> INIT -> RTR -> RTS with the attributes of qp_attr.h's buildQpTransition, one
//     ibv_modify_qp each, in that order; the RTR line (remote QPN, MTU, SL/TC and their sources, GID index,
//     rd_atomic limits) is logged at INFO.
//   - Errors: ncclSystemError naming the call, the device and port, and the errno text; a failed create() frees what
//     it made (destructor order below). A failed connect() leaves the QP in the state it reached (state()).
//   - Teardown: the GPU mappings are released first (libmlx5 frees the queue memory with the QP), then the QP is
//     destroyed, then the CQ.
#pragma once

#include <infiniband/mlx5dv.h>
#include <infiniband/verbs.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transport/rdma/conn_record.h"
#include "transport/rdma/dbproxy/doorbell_proxy.h"
#include "transport/rdma/ibgda/gpu_qp.h"
#include "transport/rdma/verbs/device.h"
#include "transport/rdma/verbs/qp_attr.h"

namespace nccl_moe::verbs {

constexpr uint32_t kRcQpMaxInlineBytes = 28;  // mlx5/wqe.h: 64 - ctrl - raddr - inline header

struct RcQpSpec {
  uint32_t max_send_wr = 64;  // send work requests asked of libmlx5 (the SQ it makes may have more WQEBBs)
  uint32_t cqe_cnt = 0;       // CQ entries asked; 0: 4 * max_send_wr
  // The GpuQp binding (gpu_qp.h): device-memory state zeroed by the caller, the lkeys of the source window and of
  // the window containing dev_state->atomic_result, who the QP belongs to, the wait bound and the error record.
  ibgda::GpuQpState* dev_state = nullptr;
  uint32_t src_lkey = 0;
  uint32_t result_lkey = 0;
  int rank = -1;
  int peer = -1;
  uint64_t timeout_ns = 0;
  ErrorRecord* dev_error = nullptr;
  // The doorbell: the UAR mapped to the GPU (map_uar) and/or the mailbox word (host memory the caller keeps,
  // 8-byte aligned) for the doorbell proxy. At least one of them.
  bool map_uar = true;
  bool uar_optional = false;    // a failed UAR mapping is not an error (the mailbox must be given)
  uint64_t* mailbox = nullptr;  // host address
};

// The connection config of a local QP toward `remote` (pure): the remote QPN of (qp_set, qp_idx) in its record,
// its LID / GID / first PSN, path MTU = min of both active MTUs, the local GID index and port, max_rd_atomic /
// max_dest_rd_atomic at the local device's maxima, SL / TC of the set. Fails (ncclInvalidUsage) on a link-layer
// mismatch or a record without that QP, naming the peer.
ncclResult_t buildConnectConfig(const PortIdentity& local, uint32_t local_psn, const rdma::ConnRecord& remote,
                                int qp_set, int qp_idx, const ServiceLevel& service, QpConnectConfig* out);

class RcQp {
 public:
  static ncclResult_t create(Device& device, const RcQpSpec& spec, std::unique_ptr<RcQp>* out);
  ~RcQp();
  RcQp(const RcQp&) = delete;
  RcQp& operator=(const RcQp&) = delete;

  // RESET -> INIT -> RTR -> RTS. Only from RESET.
  ncclResult_t connect(const QpConnectConfig& config, const ServiceLevel& service);

  uint32_t qpn() const;
  ibv_qp_state state() const { return state_; }
  const ibgda::GpuQp& view() const { return view_; }
  const mlx5dv_qp& dvQp() const { return dv_qp_; }
  bool uarMapped() const { return uar_dev_ != nullptr; }
  const std::string& uarError() const { return uar_error_; }  // why an optional UAR mapping failed
  // The view rings the mailbox from now on (before the view is handed to kernels). Needs the mailbox.
  ncclResult_t useMailbox();
  dbproxy::DoorbellRoute route() const;  // mailbox -> UAR register (MMIO)
  const mlx5dv_cq& dvCq() const { return dv_cq_; }

 private:
  explicit RcQp(Device& device) : device_(device) {}
  ncclResult_t mapQueues(const RcQpSpec& spec);
  Device& device_;
  bool retained_ = false;
  ibv_cq* cq_ = nullptr;
  ibv_qp* qp_ = nullptr;
  mlx5dv_qp dv_qp_{};
  mlx5dv_cq dv_cq_{};
  std::vector<void*> mapped_;  // host addresses passed to HostMapper::map, released in the destructor
  void* uar_dev_ = nullptr;    // the UAR register as the GPU addresses it (null: not mapped)
  void* mailbox_dev_ = nullptr;
  uint64_t* mailbox_ = nullptr;
  std::string uar_error_;
  ibv_qp_state state_ = IBV_QPS_RESET;
  ibgda::GpuQp view_{};
};

}  // namespace nccl_moe::verbs
