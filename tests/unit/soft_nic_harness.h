// Test harness of the software NIC tests: ranks (window registry + host memory backend + SoftNic), registered
// host buffers, and RC links (a QP of one rank connected to another, its queues in host memory, a HostSq posting
// on it the way the GPU code will).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "transport/emulated/memory_backend.h"
#include "transport/emulated/nic.h"
#include "transport/rdma/host_sq.h"
#include "transport/rdma/window.h"

namespace nccl_moe::emulated::testing {

namespace m = nccl_moe::mlx5;

// Iterations of a litmus test: `ci_default`, or MOE_LITMUS_ITERATIONS when set (the GPU machine runs 10^6).
inline uint64_t litmusIterations(uint64_t ci_default) {
  const char* v = std::getenv("MOE_LITMUS_ITERATIONS");
  if (v == nullptr || *v == '\0') return ci_default;
  const unsigned long long n = std::strtoull(v, nullptr, 10);
  return n > 0 ? n : ci_default;
}

struct Buffer {
  Buffer(size_t n, rdma::WindowRegistry& registry, uint32_t access, uint32_t flags) : bytes(n) {
    data = static_cast<uint8_t*>(std::aligned_alloc(64, (n + 63) / 64 * 64));
    std::memset(data, 0, n);
    result = registry.registerWindow(addr(), n, access, flags, &window);
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  uint64_t addr(size_t offset = 0) const { return reinterpret_cast<uintptr_t>(data) + offset; }
  uint64_t* word(size_t offset) const { return reinterpret_cast<uint64_t*>(data + offset); }
  m::LocalSge sge(size_t offset, uint32_t n) const { return m::LocalSge{addr(offset), window.lkey, n}; }
  m::RemoteSge remote(size_t offset) const { return m::RemoteSge{addr(offset), window.rkey}; }
  m::LocalWord local_word(size_t offset) const { return m::LocalWord{addr(offset), window.lkey}; }

  uint8_t* data;
  size_t bytes;
  rdma::Window window;
  ncclResult_t result;
};

inline NicConfig nicConfig(int rank, uint64_t seed, bool trace = false) {
  NicConfig c;
  c.rank = rank;
  c.chaos.seed = seed;
  c.trace = trace;
  return c;
}

struct Rank {
  explicit Rank(const NicConfig& config)
      : rank(config.rank),
        windows(static_cast<uint8_t>(0x10 + config.rank)),
        nic(new SoftNic(config, &backend, &windows)) {}
  Rank(int rank, uint64_t seed, bool trace = false) : Rank(nicConfig(rank, seed, trace)) {}
  ~Rank() { nic->stop(); }

  Buffer& alloc(size_t n, uint32_t access = rdma::kAccessAllRemote, uint32_t flags = 0) {
    buffers.emplace_back(new Buffer(n, windows, access, flags));
    return *buffers.back();
  }

  int rank;
  rdma::WindowRegistry windows;
  HostMemoryBackend backend;
  std::unique_ptr<SoftNic> nic;
  std::vector<std::unique_ptr<Buffer>> buffers;
};

// One RC QP of `from` connected to `to`, with a CQ of its own.
struct Link {
  Link(Rank& from, Rank& to, uint32_t wqe_cnt = 64, uint32_t cqe_cnt = 64, bool connect = true)
      : nic(from.nic.get()), mem(wqe_cnt, cqe_cnt) {
    ok = from.nic->createCq(mem.cqConfig(), &cq) == ncclSuccess &&
         from.nic->createQp(mem.qpConfig(cq), &qp, &qpn) == ncclSuccess;
    if (ok && connect) ok = from.nic->connect(qp, Responder{&to.windows, to.rank, 0}) == ncclSuccess;
    rdma::SqView sv{mem.sq, wqe_cnt, mem.sq_dbrec, mem.doorbell, qpn};
    rdma::CqView cv{mem.cq, cqe_cnt, mem.cq_dbrec};
    sq.reset(new rdma::HostSq(sv, cv));
  }
  // Waits for every posted WQE (stepping the NIC when its thread does not run).
  ncclResult_t drain(double timeout_s = 10.0) {
    if (nic->running()) return sq->waitCompleted(sq->pi(), timeout_s);
    return sq->waitCompleted(sq->pi(), timeout_s, [this] { nic->step(); });
  }

  SoftNic* nic;
  HostQueueMemory mem;
  uint32_t cq = 0, qp = 0, qpn = 0;
  bool ok = false;
  std::unique_ptr<rdma::HostSq> sq;
};

}  // namespace nccl_moe::emulated::testing
