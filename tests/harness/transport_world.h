// The one-GPU transport world of the scale-out transport's GPU tests (tests/gpu/transport_litmus_test.cu: IBGDA,
// transport_proxy_test.cu: the request proxy, transport_world_litmus_test.cu: both over 2x1, 2x2 and 4x1 worlds) and
// of moe-perf's transport mode (perf/gpu_transport.cu): R virtual ranks on one GPU (2 unless asked: ranks 0 and 1,
// two virtual nodes), each with its own software NIC (CudaMemoryBackend) and executor thread, window registry,
// mapped error record and test stream; device windows; GPU-driven QPs (EmulatedGpuQp) and request-proxy rings
// (EmulatedGpuProxy) between them; the litmus payload (a pattern word per iteration and offset) with its fill and its
// check; the mapped TestStatus a kernel reports where it stopped in; bounded device and host waits; the failure dump.
// Every wait is bounded. No GoogleTest here: tests/gpu/transport_world.h adds the tests' assertion macros and knobs.
//
// Setup allocates (cudaMalloc, cudaMemset, cudaDeviceSynchronize); do all of it before the first kernel that
// spins on a peer is launched (the CUDA backend's rule: nothing after create() may wait for the device while a
// kernel of the world spins).
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "device/ptx.cuh"
#include "transport/emulated/chaos.h"
#include "transport/emulated/cuda_backend.h"
#include "transport/emulated/gpu_queues.h"
#include "transport/emulated/nic.h"
#include "transport/emulated/proxy_queues.h"
#include "transport/rdma/dbproxy/doorbell_proxy.h"
#include "transport/rdma/ibgda/gpu_qp.h"
#include "transport/rdma/proxy/gpu_proxy.h"
#include "transport/rdma/proxy/proxy_thread.h"
#include "transport/rdma/window.h"

namespace nccl_moe::transport_world {

using nccl_moe::ErrorRecord;
using nccl_moe::Phase;
namespace em = nccl_moe::emulated;
namespace ib = nccl_moe::ibgda;
namespace rdma = nccl_moe::rdma;
namespace dev = nccl_moe::dev;
namespace px = nccl_moe::proxy;

inline constexpr uint64_t kTimeoutNs = 20ull * 1000 * 1000 * 1000;  // every device wait of the world's kernels
inline constexpr double kHostTimeoutS = 60.0;                       // host waits: longer than any device wait
inline constexpr int kThreads = 512;

__host__ __device__ inline uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
// Word w of iteration i's message (byte j of the message is byte j % 8 of word j / 8): differs between iterations.
__host__ __device__ inline uint64_t patternWord(uint64_t iter, uint64_t word) { return mix64((iter << 32) ^ word); }
// Where a test kernel stopped, in mapped host memory (first failure wins), plus its counters.
struct TestStatus {
  int failed;  // 0 ok, 1 a wait timed out, 2 a transport call returned false
  int where;   // which wait / call (see kWhere*)
  long long iter;
  long long seen;
  long long expected;
  unsigned long long mismatches;  // litmus: bytes that differ from the pattern
  long long first_bad_iter;
  long long first_bad_offset;
  unsigned long long count;    // ordering tests: tries that showed the effect
  unsigned long long corrupt;  // ordering tests: bytes that are neither the old nor the new value
  int call_result;             // MissingDoorbell / AccessErrors: what quiet returned
};
enum : int {
  kWhereAck = 1,
  kWhereSignal = 2,
  kWhereLastByte = 3,
  kWhereBWord = 4,
  kWherePut = 5,
  kWhereQuiet = 6,
  kWhereAckSend = 7,
};
inline const char* whereName(int w) {
  switch (w) {
    case kWhereAck:
      return "waiting for the receiver's ack (rank 0)";
    case kWhereSignal:
      return "waiting for the data's signal (rank 1)";
    case kWhereLastByte:
      return "polling the last data byte (rank 1)";
    case kWhereBWord:
      return "polling QP B's word (rank 1)";
    case kWherePut:
      return "a put/put_signal/signal returned false";
    case kWhereQuiet:
      return "quiet returned false";
    case kWhereAckSend:
      return "the ack signal returned false (rank 1)";
    default:
      return "nowhere";
  }
}

__device__ inline void failStatus(TestStatus* st, int code, int where, uint64_t iter, uint64_t seen,
                                  uint64_t expected) {
  if (atomicCAS(&st->failed, 0, -1) == 0) {
    st->where = where;
    st->iter = static_cast<long long>(iter);
    st->seen = static_cast<long long>(seen);
    st->expected = static_cast<long long>(expected);
    __threadfence_system();
    atomicExch(&st->failed, code);
  }
}

// Bounded wait for *word >= target (acquire, system scope).
__device__ inline bool waitGeq(const uint64_t* word, uint64_t target, TestStatus* st, int where, uint64_t iter) {
  const uint64_t start = dev::globaltimer_ns();
  uint64_t seen = 0;
  for (uint32_t spins = 0;; ++spins) {
    seen = dev::ld_acquire_sys(word);
    if (seen >= target) return true;
    if ((spins & 255u) == 255u) {
      if (dev::ld_relaxed_sys(&st->failed) != 0) return false;
      if (dev::globaltimer_ns() - start > kTimeoutNs) {
        failStatus(st, 1, where, iter, seen, target);
        return false;
      }
    }
  }
}

// The litmus payload of iteration `iter`: `bytes` bytes of patternWord(iter, ...) written by the whole block (the
// caller fences and synchronises before the transport reads them).
__device__ inline void fillLitmusSource(uint8_t* src, uint64_t iter, uint32_t bytes) {
  const uint32_t words = bytes / 8;
  uint64_t* src64 = reinterpret_cast<uint64_t*>(src);
  for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) src64[w] = patternWord(iter, w);
  if (threadIdx.x == 0)
    for (uint32_t j = words * 8; j < bytes; ++j)
      src[j] = static_cast<uint8_t>(patternWord(iter, j / 8) >> (8 * (j % 8)));
}

// The whole block compares the `bytes` received at `dst` with iteration `iter`'s payload (L2 loads: never a stale L1
// line of an earlier iteration) and adds the differing bytes to st->mismatches; the first iteration with a mismatch
// records its first differing offset.
__device__ inline void checkLitmusDestination(const uint8_t* dst, uint64_t iter, uint32_t bytes, TestStatus* st) {
  const uint32_t words = bytes / 8;
  const unsigned long long* dst64 = reinterpret_cast<const unsigned long long*>(dst);
  unsigned long long my_bad = 0;
  long long my_first = -1;
  for (uint32_t w = threadIdx.x; w < words; w += blockDim.x) {
    const uint64_t diff = __ldcg(dst64 + w) ^ patternWord(iter, w);
    if (diff != 0) {
      for (int b = 0; b < 8; ++b) my_bad += ((diff >> (8 * b)) & 0xff) != 0 ? 1 : 0;
      if (my_first < 0) my_first = static_cast<long long>(w) * 8;
    }
  }
  if (threadIdx.x == 0) {
    for (uint32_t j = words * 8; j < bytes; ++j) {
      if (__ldcg(dst + j) != static_cast<uint8_t>(patternWord(iter, j / 8) >> (8 * (j % 8)))) {
        ++my_bad;
        if (my_first < 0) my_first = j;
      }
    }
  }
  if (my_bad != 0) {
    atomicAdd(&st->mismatches, my_bad);
    if (atomicCAS(reinterpret_cast<unsigned long long*>(&st->first_bad_iter), ~0ull, iter) == ~0ull)
      st->first_bad_offset = my_first;
  }
}

template <typename T>
struct Mapped {  // one T in mapped pinned memory, zeroed
  T* host = nullptr;
  T* dev = nullptr;
  Mapped() {
    if (cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(T), cudaHostAllocMapped | cudaHostAllocPortable) !=
        cudaSuccess) {
      host = nullptr;
      return;
    }
    std::memset(static_cast<void*>(host), 0, sizeof(T));
    if (cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev), host, 0) != cudaSuccess) dev = nullptr;
  }
  ~Mapped() {
    if (host != nullptr) cudaFreeHost(host);
  }
  Mapped(const Mapped&) = delete;
  Mapped& operator=(const Mapped&) = delete;
};

struct DevWindow {
  uint8_t* ptr = nullptr;
  uint64_t bytes = 0;
  rdma::Window w{};
  uint64_t addr(uint64_t off = 0) const { return reinterpret_cast<uint64_t>(ptr) + off; }
};

struct GpuRank {
  int rank = 0;
  std::unique_ptr<rdma::WindowRegistry> windows;
  std::unique_ptr<em::CudaMemoryBackend> backend;
  std::unique_ptr<em::SoftNic> nic;
  Mapped<ErrorRecord> error;
  std::vector<void*> allocations;
  std::vector<std::unique_ptr<em::EmulatedGpuQp>> qps;
  // Doorbell-proxy mode: the rank's proxy (every QP made with doorbell_proxy; its thread: startDoorbellProxies).
  std::unique_ptr<nccl_moe::dbproxy::DoorbellProxy> doorbells;
};

// R ranks on GPU 0 (makeWorld), stream r for rank r's kernels. Destruction stops every NIC before anything they may
// touch is freed.
struct World {
  std::vector<std::unique_ptr<GpuRank>> ranks;
  std::vector<cudaStream_t> streams;
  uint64_t seed = 0;
  ~World() {
    for (auto& r : ranks)
      if (r && r->doorbells) r->doorbells->stop();
    for (auto& r : ranks)
      if (r && r->nic) r->nic->stop();
    for (cudaStream_t s : streams)
      if (s != nullptr) cudaStreamSynchronize(s);  // device waits are bounded: this ends
    for (auto& r : ranks) {
      if (!r) continue;
      r->qps.clear();
      r->nic.reset();
      r->backend.reset();
      for (void* p : r->allocations) cudaFree(p);
    }
    for (cudaStream_t s : streams)
      if (s != nullptr) cudaStreamDestroy(s);
  }
  GpuRank& operator[](int i) { return *ranks[static_cast<size_t>(i)]; }
  int size() const { return static_cast<int>(ranks.size()); }
};

// "skip" without a CUDA GPU, "" when built, else what failed. `seed`: chaos seed of rank 0's NIC (rank r gets
// seed + r); 0 = chaos off. `num_ranks` ranks; `one_stream`: each backend places every QP's copies and atomics on
// one stream (CudaBackendOptions::one_stream: a world of many QPs keeps few streams, one per NIC, so no NIC stream
// shares a hardware queue with a spinning test kernel).
inline std::string makeWorld(uint64_t seed, World* w, int num_ranks = 2, bool one_stream = false) {
  int num_devices = 0;
  if (cudaGetDeviceCount(&num_devices) != cudaSuccess || num_devices < 1) {
    (void)cudaGetLastError();
    return "skip";
  }
  if (cudaSetDevice(0) != cudaSuccess) return "cudaSetDevice(0) failed";
  w->seed = seed;
  w->ranks.resize(static_cast<size_t>(num_ranks));
  w->streams.assign(static_cast<size_t>(num_ranks), nullptr);
  for (int r = 0; r < num_ranks; ++r) {
    auto rank = std::make_unique<GpuRank>();
    rank->rank = r;
    rank->windows = std::make_unique<rdma::WindowRegistry>(static_cast<uint8_t>(0x30 + r));
    if (rank->error.host == nullptr || rank->error.dev == nullptr) return "mapped error record allocation failed";
    em::CudaBackendOptions bo;
    bo.device = 0;
    bo.one_stream = one_stream;
    if (em::CudaMemoryBackend::create(bo, &rank->backend) != ncclSuccess)
      return std::string("CudaMemoryBackend::create: ") + nccl_moe::threadLastError();
    em::NicConfig nc;
    nc.rank = r;
    nc.chaos.seed = seed != 0 ? seed + static_cast<uint64_t>(r) : 0;
    nc.max_chunk_bytes = bo.max_chunk_bytes;
    rank->nic = std::make_unique<em::SoftNic>(nc, rank->backend.get(), rank->windows.get());
    w->ranks[static_cast<size_t>(r)] = std::move(rank);
  }
  for (cudaStream_t& s : w->streams)
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) return "stream creation failed";
  return "";
}

inline std::string allocWindow(GpuRank& r, uint64_t bytes, uint32_t flags, DevWindow* out) {
  void* p = nullptr;
  if (cudaMalloc(&p, bytes) != cudaSuccess) return "cudaMalloc of a window failed";
  r.allocations.push_back(p);
  if (cudaMemset(p, 0, bytes) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) return "cudaMemset failed";
  out->ptr = static_cast<uint8_t*>(p);
  out->bytes = bytes;
  if (r.windows->registerWindow(out->addr(), bytes, rdma::kAccessAllRemote, flags, &out->w) != ncclSuccess)
    return std::string("registerWindow: ") + nccl_moe::threadLastError();
  return "";
}

// A QP of `from` to `to` (wqe_cnt WQEBBs, cqe_cnt CQEs), connected; reports into dev_error, else from's record.
// `doorbell_proxy`: the GPU rings the QP's mailbox, which from's doorbell proxy forwards (startDoorbellProxies).
inline std::string connectQp(GpuRank& from, GpuRank& to, uint32_t src_lkey, uint64_t timeout_ns, ErrorRecord* dev_error,
                             em::EmulatedGpuQp** out, uint32_t wqe_cnt = 64, uint32_t cqe_cnt = 64,
                             bool doorbell_proxy = false) {
  em::GpuQpSpec spec;
  spec.nic = from.nic.get();
  spec.backend = from.backend.get();
  spec.local_windows = from.windows.get();
  spec.responder = em::Responder{to.windows.get(), to.rank, 0};
  spec.wqe_cnt = wqe_cnt;
  spec.cqe_cnt = cqe_cnt;
  spec.src_lkey = src_lkey;
  spec.rank = from.rank;
  spec.timeout_ns = timeout_ns;
  spec.dev_error = dev_error != nullptr ? dev_error : from.error.dev;
  spec.doorbell_proxy = doorbell_proxy;
  std::unique_ptr<em::EmulatedGpuQp> q;
  if (em::EmulatedGpuQp::create(spec, &q) != ncclSuccess)
    return std::string("EmulatedGpuQp::create: ") + nccl_moe::threadLastError();
  if (doorbell_proxy) {
    if (!from.doorbells) from.doorbells = std::make_unique<nccl_moe::dbproxy::DoorbellProxy>(from.rank);
    if (from.doorbells->add(q->route()) != ncclSuccess)
      return std::string("DoorbellProxy::add: ") + nccl_moe::threadLastError();
  }
  *out = q.get();
  from.qps.push_back(std::move(q));
  return "";
}

inline std::string startNics(World& w) {
  for (int r = 0; r < w.size(); ++r)
    if (w[r].nic->start() != ncclSuccess) return std::string("SoftNic::start: ") + nccl_moe::threadLastError();
  return "";
}

// Starts the doorbell-proxy thread of every rank that has QPs made with doorbell_proxy.
inline std::string startDoorbellProxies(World& w) {
  for (int r = 0; r < w.size(); ++r) {
    if (w[r].doorbells && w[r].doorbells->start() != ncclSuccess)
      return std::string("ProxyThread::start: ") + nccl_moe::threadLastError();
  }
  return "";
}

// Bounded host wait for every rank's test stream; "" or what is still running.
// `progress` (optional): a line printed every 5 s while the kernels run (long litmus runs say how far they got).
inline std::string waitStreams(World& w, double timeout_s, const char* what,
                               const std::function<std::string()>& progress = {}) {
  const auto start = std::chrono::steady_clock::now();
  auto next_report = start + std::chrono::seconds(5);
  for (;;) {
    if (progress && std::chrono::steady_clock::now() >= next_report) {
      std::printf("%s: %s\n", what, progress().c_str());
      std::fflush(stdout);
      next_report += std::chrono::seconds(5);
    }
    bool all = true;
    for (int r = 0; r < w.size(); ++r) {
      const cudaError_t e = cudaStreamQuery(w.streams[static_cast<size_t>(r)]);
      if (e == cudaErrorNotReady) {
        all = false;
      } else if (e != cudaSuccess) {
        return std::string(what) + ": rank " + std::to_string(r) + "'s kernel failed: " + cudaGetErrorString(e);
      }
    }
    if (all) return "";
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s)
      return std::string(what) + ": kernels still running after " + std::to_string(timeout_s) + " s";
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

inline std::string describeStatus(const TestStatus& s) {
  char buf[320];
  std::snprintf(buf, sizeof(buf),
                "failed %d at %s, iteration %lld (seen %lld, expected %lld); mismatched bytes %llu (first at "
                "iteration %lld offset %lld); count %llu; corrupt %llu",
                s.failed, whereName(s.where), s.iter, s.seen, s.expected, s.mismatches, s.first_bad_iter,
                s.first_bad_offset, s.count, s.corrupt);
  return buf;
}

// Everything that helps to read a failure from the log: every NIC, their QPs, the GPU records, the backends.
inline void dumpWorld(World& w) {
  for (int r = 0; r < w.size(); ++r) {
    GpuRank& k = w[r];
    const em::NicCounters c = k.nic->counters();
    std::printf("[rank %d] %s: wqes %" PRIu64 " bytes %" PRIu64 " atomics %" PRIu64 " cqes %" PRIu64
                " error_cqes %" PRIu64 " flush_cqes %" PRIu64 " lost_cqes %" PRIu64 "; staging high water %" PRIu64
                " B; backend %s\n",
                r, k.nic->describe().c_str(), c.wqes, c.bytes_placed, c.atomics, c.cqes, c.error_cqes, c.flush_cqes,
                c.lost_cqes, k.backend->stagingHighWater(), k.backend->failed() ? k.backend->error().c_str() : "ok");
    for (const auto& q : k.qps)
      std::printf("[rank %d]   QP %u (qpn 0x%x): state %s, announced %u, retired %u%s%s\n", r, q->qp(), q->qpn(),
                  k.nic->qpState(q->qp()) == em::QpState::kReady ? "ready" : "ERROR", k.nic->qpAnnounced(q->qp()),
                  k.nic->qpRetired(q->qp()), k.nic->qpError(q->qp()).empty() ? "" : ": ",
                  k.nic->qpError(q->qp()).c_str());
    for (const std::string& e : k.nic->nicErrors()) std::printf("[rank %d]   NIC: %s\n", r, e.c_str());
    if (k.doorbells) std::printf("[rank %d]   %s\n", r, k.doorbells->describe(true).c_str());
    const ErrorRecord rec = *k.error.host;
    std::printf("[rank %d]   GPU error record: %s\n", r,
                rec.code == 0 ? "none" : ib::describeNetError(rec, kTimeoutNs).c_str());
  }
}

// The request-proxy rings of a world. Destroyed before the World (declare it after): stops the proxy threads, then
// the NICs (they read the proxies' SQs), then waits for the world's kernels (their waits are bounded), then frees
// the rings.
struct Proxies {
  World* w = nullptr;
  std::vector<std::unique_ptr<em::EmulatedGpuProxy>> all;
  ~Proxies() {
    for (auto& p : all) p->stop();
    for (auto& r : w->ranks)
      if (r && r->nic) r->nic->stop();
    for (cudaStream_t s : w->streams)
      if (s != nullptr) cudaStreamSynchronize(s);
    all.clear();
  }
};

// A ring of rank `from` with one QP per entry of `to` (one view each), not yet started.
inline std::string makeProxy(Proxies& ps, int from, const std::vector<int>& to, uint32_t num_slots, uint32_t start,
                             uint32_t src_lkey, uint64_t timeout_ns, ErrorRecord* dev_error,
                             em::EmulatedGpuProxy** out) {
  World& w = *ps.w;
  em::GpuProxySpec spec;
  spec.nic = w[from].nic.get();
  spec.backend = w[from].backend.get();
  spec.local_windows = w[from].windows.get();
  for (int peer : to) spec.qps.push_back(em::Responder{w[peer].windows.get(), peer, 0});
  spec.num_slots = num_slots;
  spec.start = start;
  spec.src_lkey = src_lkey;
  spec.rank = from;
  spec.device = 0;
  spec.timeout_ns = timeout_ns;
  spec.dev_error = dev_error != nullptr ? dev_error : w[from].error.dev;
  std::unique_ptr<em::EmulatedGpuProxy> p;
  if (em::EmulatedGpuProxy::create(spec, &p) != ncclSuccess)
    return std::string("EmulatedGpuProxy::create: ") + nccl_moe::threadLastError();
  *out = p.get();
  ps.all.push_back(std::move(p));
  return "";
}

inline std::string startProxies(Proxies& ps) {
  for (auto& p : ps.all)
    if (p->start() != ncclSuccess) return std::string("ProxyThread::start: ") + nccl_moe::threadLastError();
  return "";
}

// dumpWorld plus every ring and every rank's record as the proxy describes them.
inline void dumpProxies(World& w, Proxies& ps, uint64_t timeout_ns) {
  dumpWorld(w);
  for (size_t i = 0; i < ps.all.size(); ++i)
    std::printf("[proxy %zu, rank %d] %s\n", i, ps.all[i]->view(0).rank, ps.all[i]->describe().c_str());
  for (int r = 0; r < w.size(); ++r) {
    const ErrorRecord rec = *w[r].error.host;
    std::printf("[rank %d]   GPU error record (proxy): %s\n", r,
                rec.code == 0 ? "none" : px::describeProxyError(rec, timeout_ns).c_str());
  }
}

}  // namespace nccl_moe::transport_world
