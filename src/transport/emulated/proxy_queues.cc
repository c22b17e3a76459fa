#include "transport/emulated/proxy_queues.h"

#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "core/error.h"

namespace nccl_moe::emulated {

ncclResult_t EmulatedGpuProxy::create(const GpuProxySpec& spec, std::unique_ptr<EmulatedGpuProxy>* out) {
  MOE_ARG_CHECK(spec.nic != nullptr && spec.local_windows != nullptr && out != nullptr,
                "EmulatedGpuProxy::create: nic, local_windows and out are required");
  MOE_ARG_CHECK(!spec.qps.empty() && spec.qps.size() <= 0x10000u, "EmulatedGpuProxy::create: %zu QPs (1..65536)",
                spec.qps.size());
  MOE_ARG_CHECK(rdma::is_valid_proxy_ring_size(spec.num_slots),
                "EmulatedGpuProxy::create: num_slots %u is not a power of two", spec.num_slots);
  std::unique_ptr<EmulatedGpuProxy> p(new EmulatedGpuProxy());
  p->spec_ = spec;
  p->num_slots_ = spec.num_slots;
  p->start_ = spec.start;
  p->windows_ = spec.local_windows;

  // The ring: slots and shared words in mapped pinned host memory, the producer index in device memory.
  MOE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&p->slots_), sizeof(rdma::ProxyDesc) * spec.num_slots,
                               cudaHostAllocMapped | cudaHostAllocPortable));
  for (uint32_t s = 0; s < spec.num_slots; ++s) rdma::proxy_init_slot(&p->slots_[s], s, spec.start, spec.num_slots);
  MOE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&p->shared_), sizeof(rdma::ProxyRingShared),
                               cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(static_cast<void*>(p->shared_), 0, sizeof(rdma::ProxyRingShared));
  p->shared_->consumed = p->shared_->completed = spec.start;
  MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p->producer_index_), sizeof(uint32_t)));
  MOE_CUDA_CHECK(cudaMemcpy(p->producer_index_, &spec.start, sizeof(uint32_t), cudaMemcpyHostToDevice));
  MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p->fetch_result_), sizeof(uint64_t)));
  MOE_CUDA_CHECK(cudaMemset(p->fetch_result_, 0, sizeof(uint64_t)));
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&p->stream_, cudaStreamNonBlocking));
  MOE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&p->pi_readback_), sizeof(uint32_t), cudaHostAllocPortable));
  MOE_CUDA_CHECK(cudaDeviceSynchronize());  // setup time: no kernel of ours runs yet
  rdma::Window result_window;
  MOE_CHECK(spec.local_windows->registerWindow(reinterpret_cast<uint64_t>(p->fetch_result_), sizeof(uint64_t),
                                               rdma::kAccessLocalWrite, 0, &result_window));
  p->fetch_result_lkey_ = result_window.lkey;

  // The QPs and their host queues (connected now, or by connect()).
  for (size_t i = 0; i < spec.qps.size(); ++i) {
    MOE_ARG_CHECK(!spec.connect || spec.qps[i].windows != nullptr,
                  "EmulatedGpuProxy::create: a responder without windows");
    std::unique_ptr<Link> link(new Link());
    link->mem.reset(new HostQueueMemory(spec.wqe_cnt, spec.cqe_cnt));
    if (link->mem->sq == nullptr || link->mem->cq == nullptr || link->mem->sq_dbrec == nullptr)
      return setLastError(ncclSystemError, "EmulatedGpuProxy::create: host queue allocation failed");
    MOE_CHECK(spec.nic->createCq(link->mem->cqConfig(), &link->cq));
    MOE_CHECK(spec.nic->createQp(link->mem->qpConfig(link->cq), &link->qp, &link->qpn));
    if (spec.backend != nullptr) MOE_CHECK(spec.backend->prepareQp(link->qp));
    const rdma::SqView sv{link->mem->sq, spec.wqe_cnt, link->mem->sq_dbrec, link->mem->doorbell, link->qpn};
    const rdma::CqView cv{link->mem->cq, spec.cqe_cnt, link->mem->cq_dbrec};
    link->sq.reset(new rdma::HostSq(sv, cv));
    p->links_.push_back(std::move(link));
  }
  if (spec.connect) MOE_CHECK(p->connect(spec.qps));
  *out = std::move(p);
  return ncclSuccess;
}

ncclResult_t EmulatedGpuProxy::connect(const std::vector<Responder>& responders) {
  const GpuProxySpec& spec = spec_;
  MOE_ARG_CHECK(responders.size() == links_.size() && !proxy_,
                "EmulatedGpuProxy::connect: %zu responders for %zu QPs%s", responders.size(), links_.size(),
                proxy_ ? " (already connected)" : "");
  std::vector<rdma::ProxyQp> proxy_qps;
  for (size_t i = 0; i < links_.size(); ++i) {
    const Responder& responder = responders[i];
    MOE_ARG_CHECK(responder.windows != nullptr && responder.peer == spec.qps[i].peer,
                  "EmulatedGpuProxy::connect: QP %zu: a responder without windows or for peer %d (expected %d)", i,
                  responder.peer, spec.qps[i].peer);
    MOE_CHECK(spec.nic->connect(links_[i]->qp, responder));
    proxy_qps.push_back(rdma::ProxyQp{links_[i]->sq.get(), responder.windows->snapshot()});
  }
  rdma::RequestProxyConfig config = spec.config;
  config.fetch_result = mlx5::LocalWord{reinterpret_cast<uint64_t>(fetch_result_), fetch_result_lkey_};
  rdma::ProxyDesc* dev_slots = nullptr;
  rdma::ProxyRingShared* dev_shared = nullptr;
  MOE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_slots), slots_, 0));
  MOE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_shared), shared_, 0));
  // The consumer reads the host addresses; producer_index is the GPU's only (RequestProxy never reads it).
  const rdma::ProxyRing host_ring{slots_, spec.num_slots, producer_index_, shared_};
  proxy_.reset(new rdma::RequestProxy(host_ring, spec.start, spec.local_windows, std::move(proxy_qps), config));
  thread_.reset(new proxy::ProxyThread(proxy_.get(), spec.device));

  const proxy::GpuProxyRingMemory ring{dev_slots, spec.num_slots, producer_index_, dev_shared};
  for (size_t i = 0; i < links_.size(); ++i) {
    proxy::GpuProxyBinding b;
    b.qp = static_cast<uint32_t>(i);
    b.qpn = links_[i]->qpn;
    b.src_lkey = spec.src_lkey;
    b.rank = spec.rank;
    b.peer = spec.qps[i].peer;
    b.timeout_ns = spec.timeout_ns;
    b.error = spec.dev_error;
    proxy::GpuProxyQp v;
    const std::string why = proxy::buildGpuProxyQp(ring, b, &v);
    if (!why.empty()) return setLastError(ncclInvalidArgument, "EmulatedGpuProxy::connect: %s", why.c_str());
    views_.push_back(v);
  }
  return ncclSuccess;
}

EmulatedGpuProxy::~EmulatedGpuProxy() {
  if (thread_) thread_->stop();
  thread_.reset();
  proxy_.reset();
  links_.clear();
  if (windows_ != nullptr && fetch_result_lkey_ != 0) windows_->deregisterWindow(fetch_result_lkey_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  if (pi_readback_ != nullptr) cudaFreeHost(pi_readback_);
  if (fetch_result_ != nullptr) cudaFree(fetch_result_);
  if (producer_index_ != nullptr) cudaFree(producer_index_);
  if (shared_ != nullptr) cudaFreeHost(shared_);
  if (slots_ != nullptr) cudaFreeHost(slots_);
}

ncclResult_t EmulatedGpuProxy::producerIndex(uint32_t* out) const {
  MOE_CUDA_CHECK(cudaMemcpyAsync(pi_readback_, producer_index_, sizeof(uint32_t), cudaMemcpyDeviceToHost, stream_));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  *out = *pi_readback_;
  return ncclSuccess;
}

std::string EmulatedGpuProxy::describe() const {
  if (!thread_) return "request proxy ring of " + std::to_string(num_slots_) + " slots: not connected";
  uint32_t produced = 0;
  const bool have_pi = producerIndex(&produced) == ncclSuccess;
  char buf[512];
  int n = std::snprintf(buf, sizeof(buf),
                        "request proxy ring of %u slots from %u: producer index %s%u, consumed %u, completed %u, "
                        "ring error %u (%s); thread %s, %" PRIu64 " passes%s%s",
                        num_slots_, start_, have_pi ? "" : "(unreadable) ", produced, consumed(), completed(),
                        ringError(), proxy::proxyErrorName(ringError()),
                        thread_->running() ? (thread_->failed() ? "failed" : "running") : "stopped", thread_->passes(),
                        thread_->failed() ? ": " : "", thread_->failed() ? thread_->error().c_str() : "");
  std::string s(buf, n > 0 && static_cast<size_t>(n) < sizeof(buf) ? static_cast<size_t>(n) : sizeof(buf) - 1);
  if (!thread_->exited()) return s + "; SQ indices: once the thread has stopped";
  s += "; " + std::to_string(proxy_->descriptorsPosted()) + " descriptors posted";
  for (size_t i = 0; i < links_.size(); ++i) {
    std::snprintf(buf, sizeof(buf), "; QP %zu (qpn 0x%x): pi %u, completed %u%s%s", i, links_[i]->qpn,
                  links_[i]->sq->pi(), links_[i]->sq->completed(), links_[i]->sq->failed() ? ": " : "",
                  links_[i]->sq->failed() ? links_[i]->sq->error().c_str() : "");
    s += buf;
  }
  return s;
}

}  // namespace nccl_moe::emulated
