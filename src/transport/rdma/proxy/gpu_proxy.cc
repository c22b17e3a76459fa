#include "transport/rdma/proxy/gpu_proxy.h"

#include <cstdio>
#include <type_traits>

#include "transport/rdma/ibgda/gpu_qp.h"

namespace nccl_moe::proxy {

static_assert(std::is_trivially_copyable<GpuProxyQp>::value, "kernels receive GpuProxyQp by value");

std::string buildGpuProxyQp(const GpuProxyRingMemory& r, const GpuProxyBinding& b, GpuProxyQp* out) {
  if (out == nullptr) return "no output view";
  if (r.slots == nullptr || r.producer_index == nullptr || r.shared == nullptr)
    return "a ring pointer is null (slots, producer_index and shared are all required)";
  if (b.error == nullptr) return "no error record";
  if (!rdma::is_valid_proxy_ring_size(r.num_slots))
    return "num_slots " + std::to_string(r.num_slots) + " is not a power of two in [1, " +
           std::to_string(rdma::kProxyMaxSlots) + "]";
  if ((reinterpret_cast<uintptr_t>(r.slots) % sizeof(rdma::ProxyDesc)) != 0)
    return "the slots must be 64-byte aligned (the GPU writes them with 16-byte stores, the CPU reads 64-byte lines)";
  if ((reinterpret_cast<uintptr_t>(r.shared) % 64) != 0) return "the shared words must be 64-byte aligned";
  if ((reinterpret_cast<uintptr_t>(r.producer_index) % 4) != 0) return "the producer index must be 4-byte aligned";
  if (b.qp > 0xffffu) return "QP index " + std::to_string(b.qp) + " does not fit the descriptor's 16 bits";
  if (b.qpn > 0xffffffu) return "QPN " + std::to_string(b.qpn) + " is not a 24-bit QPN";
  if (b.timeout_ns == 0) return "timeout_ns is 0 (every wait must be bounded)";
  GpuProxyQp v{};
  v.slots = r.slots;
  v.num_slots = r.num_slots;
  v.producer_index = r.producer_index;
  v.shared = r.shared;
  v.qp = static_cast<uint16_t>(b.qp);
  v.qpn = b.qpn;
  v.lkey = b.src_lkey;
  v.rank = b.rank;
  v.peer = b.peer;
  v.timeout_ns = b.timeout_ns;
  v.error = b.error;
  *out = v;
  return "";
}

const char* proxyErrorName(uint32_t error) {
  switch (static_cast<rdma::ProxyError>(error)) {
    case rdma::ProxyError::kNone:
      return "none";
    case rdma::ProxyError::kBadDescriptor:
      return "bad descriptor";
    case rdma::ProxyError::kOverrun:
      return "producer overrun";
    case rdma::ProxyError::kTranslation:
      return "translation (unknown key or range outside its window)";
    case rdma::ProxyError::kCompletion:
      return "error completion";
    case rdma::ProxyError::kPost:
      return "post failed";
  }
  return "unknown";
}

std::string describeProxyError(const ErrorRecord& r, uint64_t timeout_ns) {
  char buf[512];
  const Phase phase = static_cast<Phase>(r.phase);
  const double timeout_s = static_cast<double>(timeout_ns) * 1e-9;
  if (r.code == kErrNone) return "no error";
  if (r.code == kErrNetProxy && r.expected < 0) {
    std::snprintf(buf, sizeof(buf),
                  "phase %s: rank %d, QP 0x%x to peer %d: the request proxy had failed (ring error %d: %s) when the "
                  "GPU was about to post a descriptor; the proxy thread's log names the descriptor",
                  phaseName(phase), r.rank, static_cast<unsigned>(r.qpn), r.peer, r.detail,
                  proxyErrorName(static_cast<uint32_t>(r.detail)));
    return buf;
  }
  if (r.code == kErrNetProxy) {
    std::snprintf(buf, sizeof(buf),
                  "phase %s: rank %d, QP 0x%x to peer %d: the request proxy failed (ring error %d: %s) while the GPU "
                  "waited for index %lld (last seen %lld); the proxy thread's log names the descriptor",
                  phaseName(phase), r.rank, static_cast<unsigned>(r.qpn), r.peer, r.detail,
                  proxyErrorName(static_cast<uint32_t>(r.detail)), r.expected, r.counter);
    return buf;
  }
  if (r.code == kErrTimeout && (phase == Phase::kNetProxyCredit || phase == Phase::kNetProxyQuiet)) {
    if (phase == Phase::kNetProxyCredit) {
      std::snprintf(buf, sizeof(buf),
                    "phase %s: rank %d, QP 0x%x to peer %d: gave up after %.3f s waiting for a ring slot: consumed "
                    "index %lld, expected %lld (is the proxy thread running?)",
                    phaseName(phase), r.rank, static_cast<unsigned>(r.qpn), r.peer, timeout_s, r.counter, r.expected);
    } else {
      // The consumed index tells a stopped proxy (never took the quiet) from a slow NIC (took it, no completion).
      const bool taken = static_cast<int32_t>(static_cast<uint32_t>(r.detail) - static_cast<uint32_t>(r.expected)) >= 0;
      std::snprintf(buf, sizeof(buf),
                    "phase %s: rank %d, QP 0x%x to peer %d: gave up after %.3f s waiting for completion of every "
                    "descriptor before the quiet: completed index %lld, expected %lld (consumed by the proxy: %u%s)",
                    phaseName(phase), r.rank, static_cast<unsigned>(r.qpn), r.peer, timeout_s, r.counter, r.expected,
                    static_cast<uint32_t>(r.detail),
                    taken ? "; the proxy took the quiet, the NIC did not complete"
                          : "; the proxy never took the quiet: is its thread running?");
    }
    return buf;
  }
  return ibgda::describeNetError(r, timeout_ns);
}

}  // namespace nccl_moe::proxy
