// A request-proxy ring that a GPU produces into and a CPU thread consumes, over the software NIC (the proxy mode's
// counterpart of gpu_queues.h's EmulatedGpuQp), and the one call that creates it end to end:
//   ring      slots: one cudaHostAlloc(Mapped | Portable) block of num_slots * 64 bytes, initialised for `start`
//             (proxy_init_slot); shared words (consumed, completed, error): a second mapped block, = start;
//             producer index: device memory, = start
//   QPs       per QP: host-memory SQ + CQ (nic.h HostQueueMemory), CQ + QP on the SoftNic, the backend's stream,
//             connected to its responder; a HostSq the proxy posts through
//   proxy     rdma::RequestProxy over the ring and the QPs (remote windows: a snapshot of each responder's
//             registry at creation: register the peer's windows first), a registered 8-byte device word for the
//             fetch-adds' results, and the ProxyThread that runs it (started by start(), not by create())
// and one GpuProxyQp view per QP (proxy/gpu_proxy.h). All allocation happens here, at setup time.
//
// Destruction stops the thread first. The caller stops the NIC before destroying this (the NIC reads the SQs
// and the kernels must be finished: their waits are bounded).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "transport/emulated/cuda_backend.h"
#include "transport/emulated/nic.h"
#include "transport/rdma/host_sq.h"
#include "transport/rdma/proxy/gpu_proxy.h"
#include "transport/rdma/proxy/proxy_thread.h"
#include "transport/rdma/request_proxy.h"
#include "transport/rdma/window.h"

namespace nccl_moe::emulated {

struct GpuProxySpec {
  SoftNic* nic = nullptr;
  CudaMemoryBackend* backend = nullptr;           // gets each QP's stream (prepareQp)
  rdma::WindowRegistry* local_windows = nullptr;  // the requester's registry (lkeys; the result word goes here)
  std::vector<Responder> qps;                     // one QP per entry (index = the descriptors' qp field); with
                                                  // connect == false only each entry's peer is read
  bool connect = true;  // false: create the ring and the QPs unconnected; connect() does the rest (communicator
                        // init: the QPNs go into the connection records before the peers are known)
  uint32_t num_slots = 64;
  uint32_t start = 0;  // first sequence number (tests: near 2^32 to cross the wrap)
  uint32_t wqe_cnt = 64;
  uint32_t cqe_cnt = 64;
  uint32_t src_lkey = 0;  // the source window every put gathers from
  int rank = -1;
  int device = 0;  // the CUDA device of the producer (and of the proxy thread)
  uint64_t timeout_ns = 10ull * 1000 * 1000 * 1000;
  ErrorRecord* dev_error = nullptr;  // device address of the rank's error record
  rdma::RequestProxyConfig config;   // fetch_result is filled in by create()
};

class EmulatedGpuProxy {
 public:
  static ncclResult_t create(const GpuProxySpec& spec, std::unique_ptr<EmulatedGpuProxy>* out);
  // After create() with spec.connect == false: connects QP i to responders[i] (same count and peers as spec.qps),
  // then builds the proxy (remote windows: a snapshot of each responder's registry now), its thread and the views.
  ncclResult_t connect(const std::vector<Responder>& responders);
  ~EmulatedGpuProxy();
  EmulatedGpuProxy(const EmulatedGpuProxy&) = delete;
  EmulatedGpuProxy& operator=(const EmulatedGpuProxy&) = delete;

  ncclResult_t start() {
    return thread_ ? thread_->start() : setLastError(ncclInternalError, "EmulatedGpuProxy::start: not connected");
  }
  ncclResult_t stop(double timeout_s = 5.0) { return thread_ ? thread_->stop(timeout_s) : ncclSuccess; }
  proxy::ProxyThread& thread() { return *thread_; }

  const proxy::GpuProxyQp& view(size_t qp_idx) const { return views_[qp_idx]; }
  size_t numQps() const { return links_.size(); }
  uint32_t nicQp(size_t qp_idx) const { return links_[qp_idx]->qp; }  // the NIC's QP index (qpState, qpError)
  uint32_t qpn(size_t qp_idx) const { return links_[qp_idx]->qpn; }
  uint32_t numSlots() const { return num_slots_; }
  uint32_t startIndex() const { return start_; }

  // The consumer's words as the GPU sees them (acquire loads of host memory; any time).
  uint32_t consumed() const { return __atomic_load_n(&shared_->consumed, __ATOMIC_ACQUIRE); }
  uint32_t completed() const { return __atomic_load_n(&shared_->completed, __ATOMIC_ACQUIRE); }
  uint32_t ringError() const { return __atomic_load_n(&shared_->error, __ATOMIC_ACQUIRE); }
  // The producer index (device memory), copied into a pinned word on a private non-blocking stream: callable
  // while kernels run (it waits for nothing else on the GPU).
  ncclResult_t producerIndex(uint32_t* out) const;
  // One line: indices, ring error, the thread's state and message, the SQs' indices. For failure logs.
  std::string describe() const;

 private:
  struct Link {
    std::unique_ptr<HostQueueMemory> mem;
    std::unique_ptr<rdma::HostSq> sq;
    uint32_t cq = 0, qp = 0, qpn = 0;
  };
  EmulatedGpuProxy() = default;

  GpuProxySpec spec_;  // kept for connect()
  uint32_t num_slots_ = 0, start_ = 0;
  rdma::ProxyDesc* slots_ = nullptr;  // host address of the mapped slots
  rdma::ProxyRingShared* shared_ = nullptr;
  uint32_t* producer_index_ = nullptr;  // device memory
  uint64_t* fetch_result_ = nullptr;    // device memory
  uint32_t* pi_readback_ = nullptr;     // pinned host word producerIndex() copies into (no pageable copies)
  uint32_t fetch_result_lkey_ = 0;
  rdma::WindowRegistry* windows_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::vector<std::unique_ptr<Link>> links_;
  std::unique_ptr<rdma::RequestProxy> proxy_;
  std::unique_ptr<proxy::ProxyThread> thread_;
  std::vector<proxy::GpuProxyQp> views_;
};

}  // namespace nccl_moe::emulated
