// Queue memory of a software-NIC QP that a GPU drives (the GPU counterpart of nic.h's HostQueueMemory), and the
// one call that creates such a QP end to end: CQ + QP on the SoftNic, the backend's stream, the registered
// fetch-add result word, and the GpuQp view kernels receive (src/transport/rdma/ibgda/gpu_qp.h).
//
// Layout: one cudaHostAlloc(Mapped | Portable) block, [SQ: wqe_cnt * 64][CQ: cqe_cnt * 64][words: one page:
// SQ doorbell record @0, doorbell word @64, CQ doorbell record @128, doorbell-proxy mailbox @192], each part
// page-aligned; the NIC uses the host addresses, the GPU the cudaHostGetDevicePointer ones. With a doorbell proxy
// (NCCL_MOE_NET_MODE=dbproxy) the GPU's view rings the mailbox instead of the doorbell word, and a CPU thread
// forwards it (src/transport/rdma/dbproxy/doorbell_proxy.h, route()). CQEs start as INVALID (owner 0). The GPU-only
// state (GpuQpState) is device memory, zeroed at creation. All allocation happens here, at setup time.
#pragma once

#include <nccl.h>

#include <cstdint>
#include <memory>

#include "transport/emulated/cuda_backend.h"
#include "transport/emulated/nic.h"
#include "transport/rdma/dbproxy/doorbell_proxy.h"
#include "transport/rdma/ibgda/gpu_qp.h"
#include "transport/rdma/window.h"

namespace nccl_moe::emulated {

class GpuQueueMemory {
 public:
  static ncclResult_t create(uint32_t wqe_cnt, uint32_t cqe_cnt, std::unique_ptr<GpuQueueMemory>* out);
  ~GpuQueueMemory();
  GpuQueueMemory(const GpuQueueMemory&) = delete;
  GpuQueueMemory& operator=(const GpuQueueMemory&) = delete;

  QpConfig qpConfig(uint32_t cq_idx) const;  // host addresses, for the NIC
  CqConfig cqConfig() const;
  // Device addresses, for the view; `via_mailbox`: its doorbell is the mailbox word (doorbell proxy).
  ibgda::GpuQpQueues gpuQueues(bool via_mailbox = false) const;
  ibgda::GpuQpState* state() const { return state_; }
  // Host view of the doorbell word (tests: ring a doorbell the GPU "forgot").
  uint64_t* hostDoorbell() const { return doorbell_; }
  uint32_t* hostSqDbrec() const { return sq_dbrec_; }
  uint64_t* hostMailbox() const { return mailbox_; }
  uint32_t wqeCnt() const { return wqe_cnt_; }

 private:
  GpuQueueMemory(uint32_t wqe_cnt, uint32_t cqe_cnt) : wqe_cnt_(wqe_cnt), cqe_cnt_(cqe_cnt) {}
  uint32_t wqe_cnt_, cqe_cnt_;
  uint8_t* block_ = nullptr;  // host address of the mapped block
  uint8_t* dev_block_ = nullptr;
  uint8_t* sq_ = nullptr;
  uint8_t* cq_ = nullptr;
  uint32_t* sq_dbrec_ = nullptr;
  uint64_t* doorbell_ = nullptr;
  uint32_t* cq_dbrec_ = nullptr;
  uint64_t* mailbox_ = nullptr;
  size_t sq_off_ = 0, cq_off_ = 0, words_off_ = 0;
  ibgda::GpuQpState* state_ = nullptr;
};

// Everything needed to create one GPU-driven QP of `nic` connected to `responder`.
struct GpuQpSpec {
  SoftNic* nic = nullptr;
  CudaMemoryBackend* backend = nullptr;           // gets the QP's stream (prepareQp)
  rdma::WindowRegistry* local_windows = nullptr;  // the requester's registry: the result word is registered here
  Responder responder;
  uint32_t wqe_cnt = 64;
  uint32_t cqe_cnt = 64;
  uint32_t src_lkey = 0;  // the source window every put gathers from
  int rank = -1;
  uint64_t timeout_ns = 10ull * 1000 * 1000 * 1000;
  ErrorRecord* dev_error = nullptr;  // device address of the rank's error record
  bool connect = true;
  bool doorbell_proxy = false;  // the GPU rings the mailbox; a DoorbellProxy must forward route() (dbproxy mode)
};

class EmulatedGpuQp {
 public:
  static ncclResult_t create(const GpuQpSpec& spec, std::unique_ptr<EmulatedGpuQp>* out);
  ~EmulatedGpuQp();

  const ibgda::GpuQp& view() const { return view_; }
  uint32_t qp() const { return qp_; }  // the NIC's QP index (qpState, qpError)
  uint32_t qpn() const { return qpn_; }
  GpuQueueMemory& memory() { return *mem_; }
  // Doorbell proxy: the mailbox the GPU rings and the NIC's doorbell word it is forwarded to.
  dbproxy::DoorbellRoute route() const;

 private:
  EmulatedGpuQp() = default;
  std::unique_ptr<GpuQueueMemory> mem_;
  rdma::WindowRegistry* windows_ = nullptr;
  uint32_t result_lkey_ = 0;
  uint32_t cq_ = 0, qp_ = 0, qpn_ = 0;
  int peer_ = -1;
  ibgda::GpuQp view_{};
};

}  // namespace nccl_moe::emulated
