#include "transport/rdma/dbproxy/doorbell_proxy.h"

#include <cinttypes>
#include <cstdio>

#include "core/error.h"
#include "transport/rdma/mlx5/byte_order.h"

namespace nccl_moe::dbproxy {

namespace {

// The 16-bit producer index a doorbell word announces: its low half is BE32(pi << 8) (mlx5/ring.h
// sq_doorbell_word).
uint32_t announcedIndex(uint64_t word) {
  return (mlx5::from_be(mlx5::Be32{static_cast<uint32_t>(word)}) >> 8) & 0xffffu;
}

}  // namespace

void ringMmio(uint64_t* uar, uint64_t word) {
  // The WQEs and the doorbell record reached memory before the GPU's mailbox store (it fenced at system scope),
  // and this thread acquired that store: a full fence orders them before the MMIO store on this CPU too.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  *reinterpret_cast<volatile uint64_t*>(uar) = word;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_sfence();  // flush the write-combining buffer: the doorbell leaves now, as one 8-byte write
#elif defined(__aarch64__)
  __asm__ __volatile__("dsb st" ::: "memory");
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

ncclResult_t DoorbellProxy::add(const DoorbellRoute& route) {
  MOE_ARG_CHECK(thread_ == nullptr, "DoorbellProxy::add: rank %d, QP 0x%x: the proxy's thread already started", rank_,
                route.qpn);
  MOE_ARG_CHECK(route.mailbox != nullptr && route.doorbell != nullptr,
                "DoorbellProxy::add: rank %d, QP 0x%x: mailbox and doorbell are required", rank_, route.qpn);
  MOE_ARG_CHECK(
      reinterpret_cast<uintptr_t>(route.mailbox) % 8 == 0 && reinterpret_cast<uintptr_t>(route.doorbell) % 8 == 0,
      "DoorbellProxy::add: rank %d, QP 0x%x: the mailbox and the doorbell must be 8-byte aligned", rank_, route.qpn);
  auto r = std::make_unique<Route>();
  r->route = route;
  r->last.store(__atomic_load_n(route.mailbox, __ATOMIC_ACQUIRE), std::memory_order_relaxed);
  routes_.push_back(std::move(r));
  return ncclSuccess;
}

ncclResult_t DoorbellProxy::progress(bool* progressed) {
  bool any = false;
  for (auto& r : routes_) {
    // Acquire: the WQEs and the doorbell record the GPU wrote before its mailbox store are visible from here on.
    const uint64_t word = __atomic_load_n(r->route.mailbox, __ATOMIC_ACQUIRE);
    if (word == r->last.load(std::memory_order_relaxed)) continue;
    if (r->route.target == DoorbellTarget::kMmio)
      ringMmio(r->route.doorbell, word);
    else
      __atomic_store_n(r->route.doorbell, word, __ATOMIC_RELEASE);
    r->last.store(word, std::memory_order_relaxed);
    forwarded_.fetch_add(1, std::memory_order_relaxed);
    any = true;
  }
  if (progressed != nullptr) *progressed = any;
  return ncclSuccess;
}

size_t DoorbellProxy::pending() const {
  size_t n = 0;
  for (const auto& r : routes_)
    n += __atomic_load_n(r->route.mailbox, __ATOMIC_ACQUIRE) != r->last.load(std::memory_order_relaxed) ? 1 : 0;
  return n;
}

ncclResult_t DoorbellProxy::start() {
  if (thread_ != nullptr)
    return setLastError(ncclInvalidUsage, "DoorbellProxy::start: rank %d: already started", rank_);
  thread_ = std::make_unique<proxy::ProxyThread>(
      "doorbell proxy", [this](bool* progressed) { return progress(progressed); }, [] { return std::string(); }, -1);
  return thread_->start();
}

ncclResult_t DoorbellProxy::stop(double timeout_s) {
  return thread_ != nullptr ? thread_->stop(timeout_s) : ncclSuccess;
}

uint64_t DoorbellProxy::lastForwarded(size_t i) const {
  return i < routes_.size() ? routes_[i]->last.load(std::memory_order_relaxed) : 0;
}

std::string DoorbellProxy::describe(bool details) const {
  bool mmio = false;
  for (const auto& r : routes_) mmio = mmio || r->route.target == DoorbellTarget::kMmio;
  char buf[160];
  std::snprintf(buf, sizeof(buf), "doorbell proxy of rank %d: %zu QPs (%s), %" PRIu64 " doorbells forwarded", rank_,
                routes_.size(), mmio ? "UAR registers" : "software NIC doorbell words", forwarded());
  std::string s = buf;
  if (!details) return s;
  for (const auto& r : routes_) {
    const uint64_t word = __atomic_load_n(r->route.mailbox, __ATOMIC_ACQUIRE);
    const uint64_t last = r->last.load(std::memory_order_relaxed);
    if (word == last) continue;
    std::snprintf(buf, sizeof(buf), "; QP 0x%x to peer %d: mailbox index %u, forwarded %u", r->route.qpn, r->route.peer,
                  announcedIndex(word), announcedIndex(last));
    s += buf;
  }
  return s;
}

}  // namespace nccl_moe::dbproxy
