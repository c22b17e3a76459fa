#include "transport/emulated/gpu_queues.h"

#include <cuda_runtime_api.h>

#include <cstring>

#include "core/error.h"
#include "transport/rdma/mlx5/cqe.h"
#include "transport/rdma/mlx5/ring.h"

namespace nccl_moe::emulated {

namespace m = nccl_moe::mlx5;

namespace {
constexpr size_t kPage = 4096;
size_t roundUp(size_t v, size_t a) { return (v + a - 1) / a * a; }
}  // namespace

ncclResult_t GpuQueueMemory::create(uint32_t wqe_cnt, uint32_t cqe_cnt, std::unique_ptr<GpuQueueMemory>* out) {
  MOE_ARG_CHECK(m::is_valid_wqe_cnt(wqe_cnt), "GpuQueueMemory: wqe_cnt %u is not a valid SQ size", wqe_cnt);
  MOE_ARG_CHECK(m::is_valid_cqe_cnt(cqe_cnt), "GpuQueueMemory: cqe_cnt %u is not a valid CQ size", cqe_cnt);
  std::unique_ptr<GpuQueueMemory> q(new GpuQueueMemory(wqe_cnt, cqe_cnt));
  q->sq_off_ = 0;
  q->cq_off_ = roundUp(static_cast<size_t>(wqe_cnt) * m::kWqebbBytes, kPage);
  q->words_off_ = q->cq_off_ + roundUp(static_cast<size_t>(cqe_cnt) * m::kCqeBytes, kPage);
  const size_t total = q->words_off_ + kPage;
  MOE_CUDA_CHECK(
      cudaHostAlloc(reinterpret_cast<void**>(&q->block_), total, cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(q->block_, 0, total);
  MOE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&q->dev_block_), q->block_, 0));
  q->sq_ = q->block_ + q->sq_off_;
  q->cq_ = q->block_ + q->cq_off_;
  q->sq_dbrec_ = reinterpret_cast<uint32_t*>(q->block_ + q->words_off_);
  q->doorbell_ = reinterpret_cast<uint64_t*>(q->block_ + q->words_off_ + 64);
  q->cq_dbrec_ = reinterpret_cast<uint32_t*>(q->block_ + q->words_off_ + 128);
  q->mailbox_ = reinterpret_cast<uint64_t*>(q->block_ + q->words_off_ + 192);
  for (uint32_t i = 0; i < cqe_cnt; ++i) q->cq_[static_cast<size_t>(i) * m::kCqeBytes + 63] = m::kCqeInitialOpOwn;
  MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&q->state_), sizeof(ibgda::GpuQpState)));
  MOE_CUDA_CHECK(cudaMemset(q->state_, 0, sizeof(ibgda::GpuQpState)));
  MOE_CUDA_CHECK(cudaDeviceSynchronize());  // setup time: no kernel of ours runs yet
  *out = std::move(q);
  return ncclSuccess;
}

GpuQueueMemory::~GpuQueueMemory() {
  if (state_ != nullptr) cudaFree(state_);
  if (block_ != nullptr) cudaFreeHost(block_);
}

QpConfig GpuQueueMemory::qpConfig(uint32_t cq_idx) const {
  QpConfig c;
  c.sq_buf = sq_;
  c.wqe_cnt = wqe_cnt_;
  c.dbrec = sq_dbrec_;
  c.doorbell = doorbell_;
  c.cq = cq_idx;
  return c;
}

CqConfig GpuQueueMemory::cqConfig() const {
  CqConfig c;
  c.buf = cq_;
  c.cqe_cnt = cqe_cnt_;
  c.dbrec = cq_dbrec_;
  return c;
}

ibgda::GpuQpQueues GpuQueueMemory::gpuQueues(bool via_mailbox) const {
  ibgda::GpuQpQueues g;
  g.sq = dev_block_ + sq_off_;
  g.wqe_cnt = wqe_cnt_;
  g.sq_dbrec = reinterpret_cast<uint32_t*>(dev_block_ + words_off_);
  g.doorbell = reinterpret_cast<uint64_t*>(dev_block_ + words_off_ + (via_mailbox ? 192 : 64));
  g.cq = dev_block_ + cq_off_;
  g.cqe_cnt = cqe_cnt_;
  g.cq_dbrec = reinterpret_cast<uint32_t*>(dev_block_ + words_off_ + 128);
  g.state = state_;
  return g;
}

ncclResult_t EmulatedGpuQp::create(const GpuQpSpec& spec, std::unique_ptr<EmulatedGpuQp>* out) {
  MOE_ARG_CHECK(spec.nic != nullptr && spec.local_windows != nullptr && out != nullptr,
                "EmulatedGpuQp::create: nic, local_windows and out are required");
  std::unique_ptr<EmulatedGpuQp> q(new EmulatedGpuQp());
  MOE_CHECK(GpuQueueMemory::create(spec.wqe_cnt, spec.cqe_cnt, &q->mem_));
  MOE_CHECK(spec.nic->createCq(q->mem_->cqConfig(), &q->cq_));
  MOE_CHECK(spec.nic->createQp(q->mem_->qpConfig(q->cq_), &q->qp_, &q->qpn_));
  if (spec.backend != nullptr) MOE_CHECK(spec.backend->prepareQp(q->qp_));
  if (spec.connect) MOE_CHECK(spec.nic->connect(q->qp_, spec.responder));
  rdma::Window result_window;
  MOE_CHECK(spec.local_windows->registerWindow(reinterpret_cast<uint64_t>(&q->mem_->state()->atomic_result),
                                               sizeof(uint64_t), rdma::kAccessLocalWrite, 0, &result_window));
  q->windows_ = spec.local_windows;
  q->peer_ = spec.responder.peer;
  q->result_lkey_ = result_window.lkey;
  ibgda::GpuQpBinding b;
  b.qpn = q->qpn_;
  b.src_lkey = spec.src_lkey;
  b.result_lkey = result_window.lkey;
  b.rank = spec.rank;
  b.peer = spec.responder.peer;
  b.timeout_ns = spec.timeout_ns;
  b.error = spec.dev_error;
  const std::string why = ibgda::buildGpuQp(q->mem_->gpuQueues(spec.doorbell_proxy), b, &q->view_);
  if (!why.empty()) return setLastError(ncclInvalidArgument, "EmulatedGpuQp::create: %s", why.c_str());
  *out = std::move(q);
  return ncclSuccess;
}

dbproxy::DoorbellRoute EmulatedGpuQp::route() const {
  dbproxy::DoorbellRoute r;
  r.mailbox = mem_->hostMailbox();
  r.doorbell = mem_->hostDoorbell();
  r.target = dbproxy::DoorbellTarget::kHostWord;
  r.peer = peer_;
  r.qpn = qpn_;
  return r;
}

EmulatedGpuQp::~EmulatedGpuQp() {
  if (windows_ != nullptr && result_lkey_ != 0) windows_->deregisterWindow(result_lkey_);
}

}  // namespace nccl_moe::emulated
